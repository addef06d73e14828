"""Secrets never print, and an unreachable server is one line naming it: the CLI as a person runs it (a
real subprocess, so what it prints is what they see), the settings listing, and the redaction helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from perf_pipeline.lib.redact import redact_text, redact_url, url_secrets
from perf_pipeline.settings import PROJECT_ROOT

PASSWORD = "s3cret-Pa55"
TOKEN = "admin-token-0123456789-zz"
WEBHOOK_TOKEN = "hook-token-987654321"
SECRETS = (PASSWORD, TOKEN, WEBHOOK_TOKEN, "hooker:hookpw")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERF_PIPELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "perf_pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "PYTHONPATH": str(PROJECT_ROOT), **env},
        check=False,
    )


def _assert_clean(out: str) -> None:
    for secret in SECRETS:
        assert secret not in out, f"{secret!r} printed:\n{out}"
    assert "Traceback" not in out, out


@pytest.mark.parametrize("command", [["migrate"], ["health"], ["archive", "list"], ["export", "status", "1"]])
def test_an_unreachable_database_is_one_line_naming_it(command: list[str]) -> None:
    proc = _cli(*command, PERF_PIPELINE_DATABASE_URL=f"postgresql://app:{PASSWORD}@127.0.0.1:1/platform")
    _assert_clean(proc.stdout + proc.stderr)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot use PostgreSQL at postgresql://app:***@127.0.0.1:1/platform")
    assert "refused" in lines[0]


def test_settings_show_no_secret() -> None:
    proc = _cli(
        "settings",
        PERF_PIPELINE_DATABASE_URL=f"postgresql://app:{PASSWORD}@db.internal:5432/platform",
        PERF_PIPELINE_REDIS_URL=f"redis://:{PASSWORD}@cache:6379/0",
        PERF_PIPELINE_ADMIN_TOKENS=f"{TOKEN},{TOKEN}x",
        PERF_PIPELINE_ALERT_WEBHOOK_URL=f"https://hooker:hookpw@hooks.example/alert?token={WEBHOOK_TOKEN}",
    )
    assert proc.returncode == 0, proc.stderr
    _assert_clean(proc.stdout + proc.stderr)
    assert "postgresql://app:***@db.internal:5432/platform" in proc.stdout
    assert "(2 tokens, not shown)" in proc.stdout
    assert "https://hooker:***@hooks.example/alert?token=***" in proc.stdout


def test_redaction_helpers() -> None:
    assert redact_url("postgresql://app:p%40ss@db/x") == "postgresql://app:***@db/x"
    assert redact_url("postgresql://app@db/x") == "postgresql://app@db/x"  # no password: unchanged
    assert redact_url("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url(None) is None
    secrets = url_secrets("postgresql://app:p%40ss@db/x")
    assert "p@ss" in secrets and "p%40ss" in secrets
    text = 'could not connect "postgresql://app:p@ss@db/x" password=p@ss'
    shown = redact_text(text, secrets)
    assert "p@ss" not in shown and "app:***@db/x" in shown
