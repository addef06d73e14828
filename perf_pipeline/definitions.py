"""The code location: everything under ``perf_pipeline/defs/`` is autoloaded (one folder per area).

Every job runs its steps in the run's own process (``in_process_executor``): the steps here are single
database statements or short loops, and a step process per asset and per check (the multiprocess
default) cost more than the work — seconds of process start and code loading per step on two cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

# Dagster marks some parameters it sets itself as beta/preview; they say nothing an operator can act on
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor),
    )
