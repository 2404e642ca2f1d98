"""Where traces go: the standard OpenTelemetry environment variables, overridden by CLI flags.

Tracing is off (and costs nothing: no hooks, no providers) unless an OTLP endpoint is
configured — by ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``, or a
flag — or asked for with ``--trace`` (which defaults to the OTLP/HTTP port on localhost).
``OTEL_SDK_DISABLED=true`` turns it off whatever else is set, as the SDK specifies.

The resolved settings travel to every actor in its ``configure`` message, so actors on nodes
whose environment lacks the variables trace to the same place as the driver.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from hetero_sched.errors import UserError

DEFAULT_ENDPOINT = "http://localhost:4318"
"""OTLP/HTTP on localhost: where a local Jaeger v2 (or any collector) listens by default."""
DEFAULT_SERVICE = "hetero-sched"
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class TraceSettings:
    """Resolved tracing configuration: a full OTLP/HTTP traces URL, a service name, a sampling ratio."""

    traces_url: str
    service_name: str = DEFAULT_SERVICE
    sample_ratio: float = 1.0
    """Fraction of requests traced, decided once per request at its root span (parent-based)."""
    export_timeout_s: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TraceSettings":
        return cls(**d)


def trace_settings(*, trace: Optional[bool] = None, endpoint: Optional[str] = None,
                   service_name: Optional[str] = None, sample: Optional[float] = None,
                   env: Optional[Mapping[str, str]] = None) -> Optional[TraceSettings]:
    """Settings from flags over environment, or None when tracing is off.

    ``trace``: True forces tracing on (default endpoint if none is configured), False off,
    None means "on if an endpoint is configured".
    """
    env = os.environ if env is None else env
    if trace is False or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    url = _traces_url(endpoint, env)
    if url is None:
        if not trace:
            return None
        url = DEFAULT_ENDPOINT + TRACES_PATH
    ratio = _sample_ratio(sample, env)
    service = service_name or env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE
    timeout = _float_env(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or _float_env(env, "OTEL_EXPORTER_OTLP_TIMEOUT")
    return TraceSettings(url, service, ratio, timeout if timeout is not None else 10.0)


def _traces_url(flag: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """The flag and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are base URLs (``/v1/traces`` appended);
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as given — the OTLP exporter spec's rule."""
    if flag:
        return _check_url(flag, "--otlp-endpoint").rstrip("/") + TRACES_PATH
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return _check_url(env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        base = _check_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "OTEL_EXPORTER_OTLP_ENDPOINT")
        return base.rstrip("/") + TRACES_PATH
    return None


def _check_url(url: str, what: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"{what}: {url!r} is not an http(s) URL (OTLP over HTTP, e.g. {DEFAULT_ENDPOINT})")
    return url


def _float_env(env: Mapping[str, str], name: str) -> Optional[float]:
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}: expected a number, got {raw!r}") from None
    if name.endswith("TIMEOUT"):
        value /= 1000.0                      # the spec gives exporter timeouts in milliseconds
    return value


_SAMPLERS = ("always_on", "always_off", "traceidratio",
             "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")


def _sample_ratio(flag: Optional[float], env: Mapping[str, str]) -> float:
    """``--trace-sample`` or ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``) as a per-request ratio.

    Requests are the traces here, so every sampler reduces to "which fraction of requests":
    the root decides and every child follows (parent-based) — across actors too.
    """
    if flag is not None:
        ratio, what = flag, "--trace-sample"
    else:
        name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        if name not in _SAMPLERS:
            raise UserError(f"OTEL_TRACES_SAMPLER: {name!r} is not one of {', '.join(_SAMPLERS)}")
        if name.endswith("always_on"):
            return 1.0
        if name.endswith("always_off"):
            return 0.0
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(raw)
        except ValueError:
            raise UserError(f"OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got {raw!r}") from None
        what = "OTEL_TRACES_SAMPLER_ARG"
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"{what}: expected a ratio in [0, 1], got {ratio}")
    return ratio
