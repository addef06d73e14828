"""The platform schema as an asset: materializing it applies pending migrations (idempotent)."""

import time

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.migrations import apply_migrations, discover


@dg.asset(
    group_name="schema",
    description="Tables, partitions' parents, indexes and views from sql/migrations, applied in order, once each.",
    kinds={"postgres"},
)
def platform_schema(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    applied = apply_migrations(postgres.url)
    context.log.info("applied %d migration(s): %s", len(applied), ", ".join(applied) or "none")
    return dg.MaterializeResult(
        metadata={
            "applied": len(applied),
            "migrations": len(discover()),
            "applied_files": dg.MetadataValue.md(
                "\n".join(f"- `{name}`" for name in applied) or "_up to date_"
            ),
            "duration_ms": (time.perf_counter() - started) * 1000,
        }
    )
