-- partition_default_rows_by_month: rows sitting in a DEFAULT partition, by UTC month.
-- Identifiers {default} (the DEFAULT partition) and {key} (its partition key column) are composed with
-- psycopg.sql. Cost: a sequential scan of DEFAULT, which the default guard keeps empty.
SELECT date_trunc('month', {key} AT TIME ZONE 'UTC')::date AS month, count(*) AS rows
FROM {default}
GROUP BY 1
ORDER BY 1
