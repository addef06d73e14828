"""The dashboard HTTP API (FastAPI): a thin layer over the read path in :mod:`perf_pipeline.lib.cache`."""
