"""The Dagster UI's pages an operator opens first render in a real browser without a JavaScript error.

Not in the default suite (``make test``): it needs Debian's Chromium and a running UI. Run it with
``make test-browser`` while ``make dev`` runs (``PERF_PIPELINE_UI_URL`` for another UI).
"""

from __future__ import annotations

import os
import urllib.request

import pytest

from perf_pipeline.screenshots import PAGES, capture, dismiss_community_popup

pytestmark = pytest.mark.browser
URL = os.environ.get("PERF_PIPELINE_UI_URL", "http://127.0.0.1:3000")


def test_the_first_pages_render_without_a_javascript_error() -> None:
    urllib.request.urlopen(f"{URL}/server_info", timeout=10)  # a clear failure when no UI runs  # noqa: S310
    dismiss_community_popup(URL)
    results = capture(URL)
    assert [r.name for r in results] == [p.name for p in PAGES]
    for result in results:
        assert result.png.startswith(b"\x89PNG") and len(result.png) > 20_000, (
            result.name
        )  # a page, not a blank
        assert result.errors == [], f"{result.url}: {result.errors}"
