"""A real headless Chromium driven over the DevTools protocol, for tests of pages raeflow writes.

No Selenium, no websocket library: ``--remote-debugging-pipe`` speaks the protocol over file descriptors 3 (to
the browser) and 4 (from it), one JSON message per NUL-terminated chunk — the transport Puppeteer uses.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    # Debian's /usr/bin/chromium is a shell launcher; the binary behind it is started directly when present.
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="raeflow-chromium-")
        import fcntl

        def high(fd: int) -> int:  # above 4, so the child's dup2 onto 3 and 4 never clobbers one of them
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return new

        to_browser_r, self._w = map(high, os.pipe())
        self._r, from_browser_w = map(high, os.pipe())
        # The child sees our pipe ends as its fds 3 and 4 (dup2 in the child before exec).
        def _fds():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1280,2000",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # close_fds=False: the fds dup2'd to 3 and 4 must survive exec; os.pipe()'s own fds are close-on-exec.
            preexec_fn=_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ transport
    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe: "
                                       + (self.proc.stderr.read(2000).decode(errors="replace")
                                          if self.proc.poll() is not None else ""))
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self._id += 1
        my_id = self._id
        msg = {"id": my_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == my_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for m in self.events:
            if m.get("method") == method and (session is None or m.get("sessionId") == session):
                return m
        while True:
            m = self._read_message(deadline)
            self.events.append(m)
            if m.get("method") == method and (session is None or m.get("sessionId") == session):
                return m

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- a page
    def load(self, path: Path) -> dict[str, Any]:
        """Open ``path`` in a new tab and return what a test needs: console errors, exceptions, failed and
        non-local requests, every image's natural size (read in the page), a PNG screenshot."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=s)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=s)
        self.wait_event("Page.loadEventFired", session=s)
        # Images decode asynchronously: wait until every one is complete (or 10 s), then read their sizes.
        images = self.send("Runtime.evaluate", {
            "expression": "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
                          ".then(() => JSON.stringify([...document.images].map(i => ({alt: i.alt, "
                          "w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}))))",
            "awaitPromise": True, "returnByValue": True}, session=s)["result"]["value"]
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=s)
        mine = [e for e in self.events if e.get("sessionId") == s]
        console_errors = [e["params"] for e in mine if e.get("method") == "Runtime.consoleAPICalled"
                          and e["params"].get("type") in ("error", "assert")]
        log_errors = [e["params"]["entry"] for e in mine if e.get("method") == "Log.entryAdded"
                      and e["params"]["entry"].get("level") == "error"]
        exceptions = [e["params"] for e in mine if e.get("method") == "Runtime.exceptionThrown"]
        failed = [e["params"] for e in mine if e.get("method") == "Network.loadingFailed"]
        urls = [e["params"]["request"]["url"] for e in mine if e.get("method") == "Network.requestWillBeSent"]
        return {"console_errors": console_errors, "log_errors": log_errors, "exceptions": exceptions,
                "failed_requests": failed, "request_urls": urls, "images": json.loads(images),
                "screenshot": base64.b64decode(shot["data"])}
