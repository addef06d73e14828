"""The platform's own tables as external assets, and the sensor that reports what PostgreSQL holds."""
