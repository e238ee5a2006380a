"""Start ``qwen3emb-export serve`` in a subprocess on a free loopback port, and stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from conftest import TORCH_BLOCKER

# The server runs with torch, transformers and onnx blocked: serving needs none of them.
LAUNCH = TORCH_BLOCKER + "\nfrom qwen3emb.cli import main\nmain()\n"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(bundle: Path, log_dir: Path, *args: str,
                   timeout: float = 90.0) -> Iterator[Server]:
    """Start the server; wait for ``/ready``; kill it on exit whatever happened."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", str(bundle), "--port", str(port), *args],
            stdout=handle, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout} s:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
