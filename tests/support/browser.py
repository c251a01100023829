"""Headless Debian chromium driven over the DevTools protocol on a pipe (test-only).

`--remote-debugging-pipe` makes chromium read protocol commands from its fd 3 and write
answers and events to its fd 4, each message a JSON object ended by a NUL byte: no port, no
websocket library. The browser runs with the flags that work on this machine (--headless
--no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
--disable-component-update --disable-sync) and a fresh --user-data-dir, and is stopped and
its directory removed on close().

    with Browser(spawn=node.spawn) as browser:    # or subprocess.Popen on the host
        browser.open("http://127.0.0.1:50750/")
        browser.wait_for("document.querySelectorAll('#namespaces tbody tr').length > 0")
        text = browser.evaluate("document.body.innerText")
        browser.screenshot(Path("docs/dashboard.png"))
        assert browser.console_errors() == []
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,860")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("chromium is not installed (make deps installs Debian's)")


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, spawn: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> None:
        self.profile = tempfile.mkdtemp(prefix="pinion-chromium-")
        commands_read, self._commands = os.pipe()  # we write, chromium reads on its fd 3
        self._answers, answers_write = os.pipe()  # chromium writes on its fd 4, we read

        def onto_3_and_4() -> None:
            high_read = os.dup(commands_read) if commands_read < 10 else commands_read
            high_write = os.dup(answers_write) if answers_write < 10 else answers_write
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        self.process = spawn([chromium(), *FLAGS, f"--user-data-dir={self.profile}",
                              "--remote-debugging-pipe", "about:blank"],
                             preexec_fn=onto_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(answers_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session = ""
        self._attach()

    # --- protocol -------------------------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._answers], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0,
             session: bool = True) -> dict[str, Any]:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._read(max(0.0, deadline - time.monotonic()))
            if message is None:
                break
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self._events.append(message)
        raise BrowserError(f"{method}: no answer within {timeout:g}s")

    def _attach(self) -> None:
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"],
                                                          "flatten": True}, session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _drain_events(self) -> None:
        while (message := self._read(0.0)) is not None:
            if "method" in message:
                self._events.append(message)

    # --- what tests use -------------------------------------------------------------------

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"!!({expression})"):
                    return
            except BrowserError:
                pass
            time.sleep(0.2)
        raise BrowserError(f"never true within {timeout:g}s: {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and browser log errors (failed loads)."""
        self._drain_events()
        errors = []
        for event in self._events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                errors.append(str(params["exceptionDetails"].get("exception", {}).get("description")
                                  or params["exceptionDetails"].get("text")))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return errors

    def close(self) -> None:
        try:
            self._send("Browser.close", session=False)
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._answers)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
