"""Every dagster.yaml variant validates against Dagster's own schemas (the classes' config types included).

The Kubernetes variant is checked against dagster-k8s' K8sRunLauncher schema, and its Helm values are
checked to render the same launcher settings (the chart itself is not available offline).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config

from perf_pipeline.settings import PROJECT_ROOT

VARIANTS = {
    "local": PROJECT_ROOT / "dagster.yaml",
    "celery": PROJECT_ROOT / "deploy" / "celery" / "dagster.yaml",
    "k8s": PROJECT_ROOT / "deploy" / "k8s" / "dagster.yaml",
}
ENV = {
    "PERF_PIPELINE_DAGSTER_PG_URL": "postgresql+psycopg2://u@db.invalid/dagster",
    "PERF_PIPELINE_DAGSTER_ARTIFACTS_DIR": "/tmp/ppt_artifacts",
    "PERF_PIPELINE_DAGSTER_COMPUTE_LOGS_DIR": "/tmp/ppt_logs",
    "PERF_PIPELINE_CELERY_BROKER_URL": "redis://cache.invalid:6379/15",
    "DAGSTER_PG_HOST": "db.invalid",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_instance_config_validates(variant: str, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    shutil.copy(VARIANTS[variant], scratch_dir / "dagster.yaml")
    config, _ = dagster_instance_config(str(scratch_dir))
    assert "postgres" in config["storage"]


def _launcher_class(config: dict) -> type:
    import importlib

    return getattr(importlib.import_module(config["module"]), config["class"])


@pytest.mark.parametrize("variant", ["celery", "k8s"])
def test_run_launcher_config_matches_its_class_schema(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    launcher = yaml.safe_load(VARIANTS[variant].read_text())["run_launcher"]
    cls = _launcher_class(launcher)
    result = process_config(resolve_to_config_type(cls.config_type()), launcher["config"])
    assert result.success, [e.message for e in result.errors]


def test_helm_values_render_the_validated_launcher() -> None:
    values = yaml.safe_load((PROJECT_ROOT / "deploy" / "k8s" / "values.yaml").read_text())
    instance = yaml.safe_load(VARIANTS["k8s"].read_text())
    launcher = instance["run_launcher"]["config"]
    helm = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"

    assert helm["jobNamespace"] == launcher["job_namespace"]
    assert [s["name"] for s in helm["envSecrets"]] == launcher["env_secrets"]
    assert (
        helm["runK8sConfig"]["containerConfig"]["resources"]
        == launcher["run_k8s_config"]["container_config"]["resources"]
    )
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "perf_pipeline.definitions"]
    assert (
        values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlDatabase"] == "dagster"
    )
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    assert (
        coordinator["config"]["queuedRunCoordinator"]["maxConcurrentRuns"]
        == instance["concurrency"]["runs"]["max_concurrent_runs"]
    )
