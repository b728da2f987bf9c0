"""Headless Chromium driven over the DevTools protocol: the viewer's browser test and benchmark use it.

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``); the websocket client is
the ``websocket-client`` package (the ``test`` extra). Console errors, uncaught exceptions and failed
loads the browser logs are all collected in :attr:`Chromium.errors`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install Debian's chromium package: apt-get update && apt-get install -y chromium"


def find_chromium() -> str:
    """Path of the Chromium binary ($TRACKSTAR_CHROMIUM, else the first of CANDIDATES on PATH)."""
    env = os.environ.get("TRACKSTAR_CHROMIUM")
    if env:
        if not Path(env).exists():
            raise FileNotFoundError(f"TRACKSTAR_CHROMIUM={env} does not exist")
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CANDIDATES)} on PATH): {INSTALL_HINT}")


class Chromium:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        import websocket  # websocket-client

        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="trackstar-chromium-")
        self._log = open(Path(self._dir) / "stderr.log", "wb")
        self.proc = subprocess.Popen(
            [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--mute-audio", f"--window-size={width},{height}",
             f"--user-data-dir={self._dir}/profile", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True)
        try:
            port = self._port()
            deadline = time.time() + timeout
            while True:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages or time.time() > deadline:
                    break
                time.sleep(0.1)
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout,
                                                  suppress_origin=True, enable_multithread=False)
            self._id = 0
            self.events: list[dict[str, Any]] = []
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _port(self) -> int:
        """The DevTools port Chromium picked (it writes DevToolsActivePort into its profile)."""
        f = Path(self._dir) / "profile" / "DevToolsActivePort"
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            if f.exists() and f.read_text().strip():
                return int(f.read_text().split()[0])
            time.sleep(0.05)
        raise TimeoutError(f"chromium did not open its DevTools port in {self.timeout:.0f} s")

    def stderr(self) -> str:
        """What Chromium wrote to stdout/stderr so far."""
        self._log.flush()
        return (Path(self._dir) / "stderr.log").read_text(errors="replace")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events seen meanwhile go to :attr:`events`)."""
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, name: str, since: int = 0) -> dict[str, Any]:
        """Block until event ``name`` arrives (or has arrived after index ``since`` of :attr:`events`)."""
        deadline = time.time() + self.timeout
        while True:
            for ev in self.events[since:]:
                if ev["method"] == name:
                    return ev
            if time.time() > deadline:
                raise TimeoutError(f"no {name} within {self.timeout:.0f} s")
            since = len(self.events)
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        mark = len(self.events)
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", mark)

    def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value; JS errors raise."""
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error-level log entries (failed loads) seen so far."""
        return self.errors_since(0)

    def errors_since(self, mark: int) -> list[str]:
        """:attr:`errors` among the events after index ``mark`` of :attr:`events`."""
        out = []
        for ev in self.events[mark:]:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                  for a in p.get("args", [])))
            elif ev["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
        return out

    def screenshot(self, path: str | os.PathLike, width: int, height: int) -> None:
        """A PNG of the page's top ``width`` x ``height`` CSS pixels."""
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """End the browser process and remove its profile."""
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
