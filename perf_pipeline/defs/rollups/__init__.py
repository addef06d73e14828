"""Daily usage rollups: the `usage_daily_metrics` asset, its checks, schedules, KPI buckets and the reconciliation check."""
