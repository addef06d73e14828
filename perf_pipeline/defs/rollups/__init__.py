"""Daily usage rollups (issue 4): the `usage_daily_metrics` asset, its checks, schedules and late-data sensor."""
