"""A real Jaeger v2 (built from source by `.ci/run`) on loopback, with in-memory storage.

Jaeger's built-in all-in-one config binds fixed ports (4317/4318/16686); this one picks free
ports, so a test Jaeger never collides with one a developer is running. Without a binary the
tracing tests skip with the reason — except under CI (``CI=true``), where they fail: CI always
checks the real thing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

JAEGER_VERSION = "v1.76.0"          # the same commit as Jaeger v2.13.0
DEFAULT_BIN = Path.home() / ".cache" / "hetero-sched" / f"jaeger-{JAEGER_VERSION}" / "jaeger"

CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 200000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


def jaeger_binary() -> Optional[Path]:
    for candidate in (os.environ.get("HETERO_JAEGER_BIN"), DEFAULT_BIN, shutil.which("jaeger")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Jaeger:
    """A running Jaeger: where to send OTLP, and its query API."""

    otlp_endpoint: str
    query_url: str
    process: subprocess.Popen

    def get(self, path: str, **params: Any) -> Any:
        url = f"{self.query_url}{path}?{urllib.parse.urlencode(params)}" if params else self.query_url + path
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())

    def services(self) -> list[str]:
        return self.get("/api/services")["data"] or []

    def traces(self, service: str, limit: int = 100000) -> list[dict[str, Any]]:
        """Every trace of ``service`` (Jaeger's JSON: spans with references, processes)."""
        now_us = int(time.time() * 1e6)
        return self.get("/api/traces", service=service, limit=limit, start=now_us - 3 * 3600 * 10**6,
                        end=now_us + 3600 * 10**6)["data"] or []


def start_jaeger(tmp: Path) -> Jaeger:
    binary = jaeger_binary()
    if binary is None:
        reason = (f"no Jaeger binary (looked at $HETERO_JAEGER_BIN, {DEFAULT_BIN}, PATH); "
                  "`.ci/run` builds it with Go")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    ports = {"otlp": _free_port(), "query": _free_port(), "query_grpc": _free_port()}
    config = tmp / "jaeger.yaml"
    config.write_text(CONFIG.format(**ports))
    log = open(tmp / "jaeger.log", "wb")
    proc = subprocess.Popen([str(binary), f"--config=file:{config}"], stdout=log, stderr=subprocess.STDOUT)
    jaeger = Jaeger(f"http://127.0.0.1:{ports['otlp']}", f"http://127.0.0.1:{ports['query']}", proc)
    deadline = time.monotonic() + 60
    while True:
        try:
            jaeger.services()
            return jaeger
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"Jaeger did not start: see {tmp / 'jaeger.log'}:\n{(tmp / 'jaeger.log').read_text()[-2000:]}")
            time.sleep(0.2)
