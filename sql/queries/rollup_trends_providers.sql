-- rollup_trends_providers: sessions, minutes and revenue per STT provider and period over the days
-- [%(start)s, %(end)s], from usage_daily_provider_metrics (every provider present, no fixed list).
-- Cost: one index range scan of the provider rollup (a few rows per day).
SELECT date_trunc(%(unit)s, day::timestamp)::date AS period,
       stt_provider                               AS provider,
       sum(sessions)                              AS session_count,
       sum(minutes)                               AS minutes,
       sum(revenue)                               AS revenue
FROM usage_daily_provider_metrics
WHERE day BETWEEN %(start)s AND %(end)s
GROUP BY 1, 2
ORDER BY 1, 4 DESC, 2;
