"""Background exports: a sensor launches one `export_job` run per pending `data_export` request."""
