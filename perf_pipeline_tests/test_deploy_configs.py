"""Every dagster.yaml variant validates against Dagster's own schemas (the classes' config types included).

The Kubernetes variant is checked against dagster-k8s' K8sRunLauncher schema, and its Helm values are
checked to render the same launcher settings (the chart itself is not available offline).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
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


# ---------------------------------------------------------------- archives and exports on object storage

DEPLOY = PROJECT_ROOT / "deploy"
FOLDERS = ("PERF_PIPELINE_ARCHIVE_DIR", "PERF_PIPELINE_EXPORT_DIR")


def _assignments(node: object) -> Iterator[tuple[str, str]]:
    """Every (variable, value) a YAML document sets: ``KEY=VALUE`` strings (K8sRunLauncher env_vars, Helm
    envVars), ``{name: KEY, value: VALUE}`` items (Kubernetes env) and ``KEY: VALUE`` mappings."""
    if isinstance(node, str):
        key, sep, value = node.partition("=")
        if sep and key.strip().isidentifier():
            yield key.strip(), value.strip()
    elif isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node:
            yield node["name"], str(node["value"])
        for key, value in node.items():
            if isinstance(key, str) and isinstance(value, str | int | float) and key.isupper():
                yield key, str(value)
            yield from _assignments(value)
    elif isinstance(node, list):
        for item in node:
            yield from _assignments(item)


def _env_file(path: Path) -> Iterator[tuple[str, str]]:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            yield key.removeprefix("export ").strip(), value.strip().strip("'\"")


def _deploy_settings() -> dict[str, list[tuple[str, str, str]]]:
    """file → (variable, value, where) for every PERF_PIPELINE_*_DIR / AWS_* a deploy config sets."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            pairs = list(_assignments(yaml.safe_load(path.read_text())))
        elif path.suffix == ".env":
            pairs = list(_env_file(path))
        else:
            continue
        rel = str(path.relative_to(PROJECT_ROOT))
        found[rel] = [(k, v, rel) for k, v in pairs if k in FOLDERS or k.startswith("AWS_")]
    return found


def test_deployments_keep_archives_and_exports_on_object_storage() -> None:
    """A run pod (k8s) or a Celery worker's disk is no place for the only copy of an archived month or for a
    file a user downloads later: every deploy config must point both folders at s3://, with the AWS keys
    from a secret (never inlined)."""
    from perf_pipeline.settings import Settings

    found = _deploy_settings()
    for config in ("deploy/k8s/dagster.yaml", "deploy/k8s/values.yaml", "deploy/celery/perf-pipeline.env"):
        assert {k for k, _, _ in found[config]} >= set(FOLDERS), f"{config} does not set both folders"
    for pairs in found.values():
        for var, value, where in pairs:
            if var in FOLDERS:
                parsed = getattr(Settings.from_env({var: value}), var.removeprefix("PERF_PIPELINE_").lower())
                assert isinstance(parsed, str) and parsed.startswith("s3://"), (
                    f"{where} sets {var}={value}: a local path; archives and exports must go to object "
                    "storage (s3://bucket/prefix) in a deployment"
                )
            assert var not in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"), f"{where} inlines {var}"
    launcher = yaml.safe_load(VARIANTS["k8s"].read_text())["run_launcher"]["config"]
    helm = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    assert "perf-pipeline-s3" in launcher["env_secrets"]
    assert sorted(launcher["env_vars"]) == sorted(helm["runLauncher"]["config"]["k8sRunLauncher"]["envVars"])
    deployment = helm["dagster-user-deployments"]["deployments"][0]
    assert {"name": "perf-pipeline-s3"} in deployment["envSecrets"]


def test_the_object_storage_check_catches_a_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above fails on a deploy config that points a folder at a local path (a copy of deploy/)."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    env = copy / "celery" / "perf-pipeline.env"
    env.write_text(
        env.read_text().replace("s3://perf-pipeline-exports/exports", "/var/lib/perf_pipeline/exports")
    )
    monkeypatch.setattr(sys.modules[__name__], "DEPLOY", copy)
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_ROOT", tmp_path)
    with pytest.raises(
        AssertionError, match="PERF_PIPELINE_EXPORT_DIR=/var/lib/perf_pipeline/exports: a local"
    ):
        test_deployments_keep_archives_and_exports_on_object_storage()
