"""``move_default_rows``: empty the DEFAULT partitions into proper monthly partitions (creating them)."""

import time

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib import partitioning


class MoveDefaultRowsConfig(dg.Config):
    tables: list[str] = ["audit_log", "usage_log"]
    batch_size: int = 10_000


@dg.op(
    pool="postgres_heavy",
    description="Move DEFAULT rows into their months' partitions in batches; re-runnable.",
)
def move_default_rows_op(
    context: dg.OpExecutionContext, config: MoveDefaultRowsConfig, postgres: PostgresResource
) -> dict[str, int]:
    moved: dict[str, int] = {}
    with postgres.connection(autocommit=True) as conn:
        for table in config.tables:
            started = time.perf_counter()
            result = partitioning.move_default_rows(conn, table, batch_size=config.batch_size)
            moved[table] = result.rows_moved
            context.log.info(
                "%s: moved %d row(s) in %d batch(es), months %s, created %s",
                table,
                result.rows_moved,
                result.batches,
                [m.isoformat() for m in result.months],
                result.partitions_created,
            )
            context.add_output_metadata(
                {
                    f"{table}_rows": result.rows_moved,
                    f"{table}_partitions_created": len(result.partitions_created),
                    f"{table}_duration_ms": (time.perf_counter() - started) * 1000,
                }
            )
    return moved


@dg.job(
    description="Move rows out of audit_log_default / usage_log_default into monthly partitions, creating "
    "them; no row lost or duplicated, safe to re-run. Run it when a *_default_partition_empty check fails."
)
def move_default_rows() -> None:
    move_default_rows_op()
