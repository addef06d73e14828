"""Dashboard cache area: the `dashboard_cache` asset (Redis) and its checks."""
