"""Settings: defaults serve the embedded setup; a bad value is an error that names the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perf_pipeline.settings import PROJECT_ROOT, Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url is None and s.redis_url is None
    assert s.premake_months == 3 and s.audit_retention_months == 12 and s.usage_retention_months == 24
    assert s.archive_dir.is_absolute() and s.state_dir == PROJECT_ROOT / ".perf_pipeline"
    assert 60 <= s.kpi_ttl_seconds <= 300 and 60 <= s.trends_ttl_seconds <= 300


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "PERF_PIPELINE_PREMAKE_MONTHS": "6",
            "PERF_PIPELINE_ARCHIVE_DIR": "/srv/archive",
            "PERF_PIPELINE_DATABASE_URL": "postgresql://u@db:5432/platform",
            "PERF_PIPELINE_ADMIN_TOKENS": "a" * 20 + ", " + "b" * 20,
        }
    )
    assert s.premake_months == 6 and str(s.archive_dir) == "/srv/archive"
    assert s.admin_tokens == ("a" * 20, "b" * 20)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("PERF_PIPELINE_PREMAKE_MONTHS", "three", "must be an integer"),
        ("PERF_PIPELINE_PREMAKE_MONTHS", "0", "between 1 and 36"),
        ("PERF_PIPELINE_USAGE_RETENTION_MONTHS", "2", "between 4"),
        ("PERF_PIPELINE_KPI_TTL_SECONDS", "3600", "between 60 and 300"),
        ("PERF_PIPELINE_DATABASE_URL", "mysql://x/y", "scheme postgresql"),
        ("PERF_PIPELINE_DATABASE_URL", "postgresql://host:5432", "must name a database"),
        ("PERF_PIPELINE_REDIS_URL", "http://x", "scheme redis"),
        ("PERF_PIPELINE_ADMIN_TOKENS", "short", "at least 16"),
        ("PERF_PIPELINE_ANALYTICS_BUDGET_MS", "fast", "must be a number"),
        ("PERF_PIPELINE_ARCHIVE_DIR", "s3:/bucket/audit", "expected an s3://bucket/prefix URL"),
        ("PERF_PIPELINE_ARCHIVE_DIR", "s3://Bucket_Name/audit", "is not a bucket name"),
        ("PERF_PIPELINE_ARCHIVE_DIR", "s3://key:secret@bucket/audit", "AWS_ACCESS_KEY_ID"),
        ("PERF_PIPELINE_EXPORT_DIR", "s3://bucket/exports?endpoint_override=x", "AWS_ENDPOINT_URL"),
        ("PERF_PIPELINE_EXPORT_DIR", "s3://bucket/../exports", "plain path segments"),
        ("PERF_PIPELINE_EXPORT_DIR", "gs://bucket/exports", "only s3:// object storage"),
        ("PERF_PIPELINE_USER_TOKENS", "not-a-uuid:" + "t" * 20, "part before ':' is not a UUID"),
        ("PERF_PIPELINE_USER_TOKENS", "00000000-0000-4000-8000-000000000001:short", "at least 16"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)


def test_every_setting_is_documented() -> None:
    rows = Settings.documented()
    assert all(var.startswith("PERF_PIPELINE_") and doc for var, _, doc in rows)
    readme = (PROJECT_ROOT / "README.md").read_text()
    missing = [var for var, _, _ in rows if var not in readme]
    assert not missing, f"README does not document {missing}"


def test_cli_reports_bad_setting_with_exit_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "perf_pipeline.cli", "migrate"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PERF_PIPELINE_DATABASE_URL": "nope://x"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "PERF_PIPELINE_DATABASE_URL" in proc.stderr


def test_object_storage_locations_and_user_tokens() -> None:
    """An s3:// URL stays a URL (it used to become a relative folder named `s3:` under the project root);
    a user token may name the user whose exports it reaches."""
    from perf_pipeline.settings import UserToken, shown

    s = Settings.from_env(
        {
            "PERF_PIPELINE_ARCHIVE_DIR": "s3://perf-archive/audit/",
            "PERF_PIPELINE_EXPORT_DIR": "exports-here",
            "PERF_PIPELINE_USER_TOKENS": "00000000-0000-4000-8000-0000000000AB:" + "u" * 20 + ", " + "b" * 20,
        }
    )
    assert s.archive_dir == "s3://perf-archive/audit"
    assert s.export_dir == PROJECT_ROOT / "exports-here"  # a relative folder, as before
    assert s.user_tokens == (
        UserToken("u" * 20, "00000000-0000-4000-8000-0000000000ab"),
        UserToken("b" * 20, None),
    )
    assert "u" * 20 not in repr(s) and s.secret_tokens() == ("u" * 20, "b" * 20)
    assert Settings(user_tokens=("c" * 20,)).user_tokens == (UserToken("c" * 20),)  # type: ignore[arg-type]
    assert shown("PERF_PIPELINE_USER_TOKENS", "x" * 20 + "," + "y" * 20) == "(2 tokens, not shown)"


def test_cli_reports_a_bad_storage_url_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "perf_pipeline.cli", "archive", "list"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PERF_PIPELINE_ARCHIVE_DIR": "s3://key:hunter2secret@bucket/x"},
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 2 and "PERF_PIPELINE_ARCHIVE_DIR" in proc.stderr
    assert "hunter2secret" not in proc.stderr + proc.stdout
