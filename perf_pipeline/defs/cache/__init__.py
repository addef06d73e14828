"""Dashboard cache area: the `dashboard_cache` asset (Redis), its checks, schedule and rollup sensor."""
