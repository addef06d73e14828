-- rollup_provider_breakdown: sessions per STT provider over the days [%(start)s, %(end)s] and their
-- share of all sessions, from usage_daily_provider_metrics (cost: a few rows per day, no usage_log).
SELECT stt_provider AS provider,
       sum(sessions) AS session_count,
       round(100.0 * sum(sessions) / nullif(sum(sum(sessions)) OVER (), 0), 2) AS percentage
FROM usage_daily_provider_metrics
WHERE day BETWEEN %(start)s AND %(end)s
GROUP BY stt_provider
HAVING sum(sessions) > 0
ORDER BY session_count DESC, provider;
