"""Old months leave the hot database as verified Parquet files (audit archive, usage retention)."""
