"""Headless Chromium driven over the DevTools protocol (CDP), for testing the js extension in ComfyUI's real
front end. Needs the ``chromium`` binary and ``aiohttp`` (a ComfyUI requirement); callers skip otherwise."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One page of a headless Chromium: :meth:`evaluate` JavaScript (awaiting promises), console errors kept."""

    def __init__(self, ws, loop) -> None:
        self._ws, self._loop, self._id = ws, loop, 0
        self.errors: list[str] = []

    async def _call(self, method: str, **params):
        self._id += 1
        my_id = self._id
        await self._ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = json.loads((await self._ws.receive()).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:2000])

    async def evaluate(self, expression: str):
        result = await self._call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def screenshot(self, path) -> None:
        """Save what the page shows now as a PNG (for looking at workflows as a user sees them)."""
        import base64
        from pathlib import Path

        shot = await self._call("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    async def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise TimeoutError(f"not true within {timeout} s: {expression}")


VIEWPORT = (1600, 900)  # a laptop's browser window: workflows must open readable in it


async def open_page(url: str, body, viewport: tuple[int, int] = VIEWPORT) -> object:
    """Start Chromium, open ``url``, run ``await body(page)``, always stop the browser; returns body's value."""
    import aiohttp

    port = _free_port()
    profile = tempfile.mkdtemp(prefix="metalora_chromium_")
    proc = subprocess.Popen(
        [
            chromium_binary(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--window-size={viewport[0]},{viewport[1]}",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tabs = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as resp:
                    tabs = json.load(resp)
                break
            except OSError:
                time.sleep(0.1)
        if tabs is None:
            raise RuntimeError("headless Chromium did not start")
        ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = Page(ws, asyncio.get_running_loop())
            await page._call("Runtime.enable")
            await page._call("Page.enable")
            await page._call(
                "Emulation.setDeviceMetricsOverride",
                width=viewport[0],
                height=viewport[1],
                deviceScaleFactor=1,
                mobile=False,
            )
            await page._call("Page.navigate", url=url)
            return await body(page)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


# the app is up, connected, and has opened its first workflow (a graph built before that would be replaced)
READY = (
    "!!(window.app && window.app.graph && window.LiteGraph && window.app.extensions?.length && "
    "window.app.api?.clientId && window.app.extensionManager?.workflow?.activeWorkflow)"
)


async def ready(page: Page) -> None:
    """Wait until ComfyUI's front end is up, connected, and has opened its first workflow."""
    await page.wait_for(READY, timeout=120)
    await asyncio.sleep(1.0)  # let the first workflow finish loading into the canvas
