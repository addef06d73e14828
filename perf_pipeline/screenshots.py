"""Screenshots of the Dagster UI in headless Chromium, and the JavaScript errors the pages raise.

``make screenshots`` (``python -m perf_pipeline.screenshots``) points Debian's Chromium (the ``chromium``
package: ``apt-get install chromium``) at a running ``make dev`` and writes PNGs of the pages an operator
reads first to ``docs/images/``. It drives the browser over the Chrome DevTools Protocol with the
``websockets`` package (already installed with uvicorn), so nothing else is needed: it opens each page,
waits until the page has settled, records uncaught exceptions and console errors, and saves the picture.
Exit code 1 when a page raised a JavaScript error. ``perf_pipeline_tests/browser`` runs the same pages as a
test (not in the default suite: it needs the browser and a running UI).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from perf_pipeline.settings import PROJECT_ROOT

GROUPS = ("schema", "partitions", "platform", "rollups", "cache", "archive", "exports", "maintenance")
#: the global lineage with every group open (the UI keeps the open groups in the URL, as global@global:<group>)
LINEAGE = "/asset-groups?expanded=" + "%2C".join(f"global%40global%3A{g}" for g in GROUPS)


@dataclass(frozen=True)
class Page:
    name: str  # the PNG's file name
    path: str  # the page in the UI
    what: str  # what it shows (the README's caption)
    settle_s: float = 8.0  # how long the page may take to load and draw
    width: int = 1600
    height: int = 1000
    click: str | None = None  # the text of a button to press once the page has settled


PAGES: tuple[Page, ...] = (
    Page("lineage.png", LINEAGE, "the global lineage, every group open", 12.0, 1800, 2400),
    Page(
        "partitions.png", "/assets/usage_daily_metrics?view=partitions", "a daily asset's partition bar", 10.0
    ),
    Page("checks.png", "/assets/usage_daily_metrics?view=checks", "the rollup's checks and their history"),
    Page(
        "plots.png",
        "/assets/usage_daily_metrics",
        "each day's sessions, revenue, users, plotted",
        10.0,
        click="Plots",
    ),
    Page("freshness.png", "/assets/dashboard_cache", "the cache's freshness policy and automation condition"),
    Page(
        "archive.png",
        "/assets/audit_log_archive?view=partitions",
        "the audit months past retention, offered for archiving",
        10.0,
    ),
    Page("automation.png", "/automation", "every schedule and sensor, running by default"),
    Page("runs.png", "/runs", "the run history"),
)
# Chromium's connections to Google's hosts fail on a closed network: keep it from trying
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


@dataclass
class PageResult:
    name: str
    url: str
    errors: list[str] = field(default_factory=list)
    png: bytes = b""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("error: no Chromium found: install Debian's package (apt-get install chromium)")


class _Cdp:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    async def call(self, method: str, **params: object) -> dict:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(await asyncio.wait_for(self.ws.recv(), timeout=left)))
            except TimeoutError:
                return


def _errors(events: list[dict]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            out.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
    return out


async def _shoot(base: str, pages: tuple[Page, ...], port: int) -> list[PageResult]:
    import websockets

    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())  # noqa: S310
    target = next(t for t in targets if t.get("type") == "page")
    results = []
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
        cdp = _Cdp(ws)
        await cdp.call("Page.enable")
        await cdp.call("Runtime.enable")
        for page in pages:
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                width=page.width,
                height=page.height,
                deviceScaleFactor=1,
                mobile=False,
            )
            cdp.events.clear()
            url = base.rstrip("/") + page.path
            await cdp.call("Page.navigate", url=url)
            await cdp.drain(page.settle_s)
            if page.path == LINEAGE:  # the graph opens on its middle, a little too close: one step back
                await cdp.call(
                    "Input.dispatchMouseEvent",
                    type="mouseWheel",
                    x=page.width * 0.6,
                    y=page.height * 0.5,
                    deltaX=0,
                    deltaY=100,
                    modifiers=2,  # ctrl: the graph zooms instead of panning
                )
                await cdp.drain(2.0)
            if page.click:
                await cdp.call(
                    "Runtime.evaluate",
                    expression="[...document.querySelectorAll('button')].find(b => b.textContent.trim() === "
                    f"{json.dumps(page.click)})?.click()",
                )
                await cdp.drain(4.0)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            results.append(PageResult(page.name, url, _errors(cdp.events), base64.b64decode(shot["data"])))
    return results


def capture(base: str = "http://127.0.0.1:3000", pages: tuple[Page, ...] = PAGES) -> list[PageResult]:
    """Open every page of ``pages`` on ``base`` in one headless Chromium; the pictures and JS errors."""
    binary = chromium_binary()
    from perf_pipeline.testing import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ppt_chromium_", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=1)  # noqa: S310
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("error: Chromium did not open its debugging port") from None
                    time.sleep(0.2)
            return asyncio.run(_shoot(base, pages, port))
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


def dismiss_community_popup(base: str) -> None:
    """The UI greets a local instance with a newsletter sign-up over every page; "Skip" records that in
    the instance (the ``setNuxSeen`` mutation), which is what this does."""
    request = urllib.request.Request(
        f"{base.rstrip('/')}/graphql",
        data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with contextlib.suppress(OSError):
        urllib.request.urlopen(request, timeout=10).read()  # noqa: S310


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf_pipeline.screenshots",
        description="PNGs of the Dagster UI of a running `make dev`, and the JavaScript errors of its pages.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the Dagster UI (default: make dev's)")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "docs" / "images", help="folder for the PNGs"
    )
    args = parser.parse_args(argv)
    try:
        urllib.request.urlopen(f"{args.url.rstrip('/')}/server_info", timeout=5)  # noqa: S310
    except OSError as exc:
        print(f"error: no Dagster UI at {args.url} ({exc}): start it with `make dev`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dismiss_community_popup(args.url)
    failed = False
    for result in capture(args.url):
        (args.out / result.name).write_bytes(result.png)
        print(
            f"{args.out / result.name}: {result.url}"
            + (f"  JS errors: {result.errors}" if result.errors else "")
        )
        failed |= bool(result.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
