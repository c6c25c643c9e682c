"""A small driver of headless Chromium over the DevTools protocol (the ``websockets`` package), for the search
page's browser test: load a URL, evaluate JavaScript, wait for a condition, type, click, take screenshots.

    with Browser() as b:
        b.go("http://127.0.0.1:8080/?q=a+dog")
        b.wait("document.querySelector('#status').dataset.state === 'done'")
        b.screenshot("page.png")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium`` package), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with one page, driven synchronously (each call runs the protocol to its answer)."""

    def __init__(self, width: int = 900, height: int = 1200, timeout: float = 20.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.port = free_port()
        # Chromium's helper processes can still write into the profile for a moment after the main one
        # exits (seen at teardown on a loaded machine: "Directory not empty"); close() retries the removal.
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [
                chromium() or "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={self.profile.name}",
                f"--remote-debugging-port={self.port}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.loop = asyncio.new_event_loop()
        self._id = 0
        try:
            self.ws = self.loop.run_until_complete(self._connect())
            self.call("Runtime.enable")
            self.call("Page.enable")
            self.viewport(width, height)
        except BaseException:
            self.close()
            raise

    async def _connect(self):
        import websockets

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
                    page = next(t for t in json.load(r) if t["type"] == "page")
                return await websockets.connect(page["webSocketDebuggerUrl"], max_size=100_000_000)
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"chromium did not start its DevTools endpoint on port {self.port}") from None
                await asyncio.sleep(0.2)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        await self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), self.timeout))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise)."""
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            with contextlib.suppress(RuntimeError):
                value = self.js(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout or self.timeout} s for {expression}")
            time.sleep(0.1)

    def go(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def type(self, selector: str, text: str) -> None:
        """Focus ``selector``, clear it and type ``text`` as key presses."""
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of ``selector`` (scrolled into view first)."""
        x, y = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def hover(self, selector: str) -> None:
        x, y = self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """A PNG of the page (its whole height with ``full_page``)."""
        if full_page:
            self.viewport(self.width, int(self.js("document.documentElement.scrollHeight")))
        time.sleep(0.2)  # let the layout settle
        data = self.call("Page.captureScreenshot", format="png")["data"]
        if full_page:
            self.viewport(self.width, self.height)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.ws.close())
        self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for _ in range(20):
            self.profile.cleanup()
            if not Path(self.profile.name).exists():
                break
            time.sleep(0.1)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
