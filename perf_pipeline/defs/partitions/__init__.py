"""Monthly partitions of audit_log and usage_log: created ahead, DEFAULT kept empty."""
