"""A real iclserve process for end-to-end tests: `iclserve serve` with uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.fakes.upstream import FakeUpstream


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _iclserve() -> list[str]:
    script = Path(sys.executable).with_name("iclserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app"]


class Server:
    """`env` adds to (or overrides) the server's environment, e.g. its ICLSERVE_UPSTREAMS."""

    def __init__(
        self, data_dir: Path, upstream: FakeUpstream, *, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "ICLSERVE_DATA_DIR": str(data_dir),
            "ICLSERVE_HOST": "127.0.0.1",
            "ICLSERVE_PORT": str(self.port),
            "ICLSERVE_UPSTREAMS": json.dumps(
                [{"name": "fake", "base_url": upstream.base_url, "models": ["*"]}]
            ),
            "HF_HUB_OFFLINE": "1",
        }
        self.env.pop("ICLSERVE_EMBEDDING__KIND", None)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # how long the last start() took to be ready
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*_iclserve(), "serve"],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        started = time.monotonic()
        deadline = started + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - started
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError("server did not become ready: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_iclserve(), "--url", self.url, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
