"""Requests and workloads: synthetic generators, trace readers, rate scaling.

A :class:`Workload` is columnar (numpy arrays) so a million requests cost tens of MB, not a
million Python objects; :meth:`Workload.requests` yields :class:`Request` records lazily.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, NoReturn, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from hetero_sched.core.request import Request
from hetero_sched.errors import UserError

MAX_TOKENS = 1_000_000_000
"""Largest prompt or output length accepted anywhere (config, trace, sampled): beyond it a
value is a typo or an overflow, not a request."""
MAX_REQUESTS = 100_000_000
"""Largest synthetic workload (the simulator is sized for millions, ~1.5 GB per million)."""
REQUEST_CHUNK = 65536
"""Requests made into Python objects at a time by :meth:`Workload.requests`."""
MAX_SPAN_S = 1e9
"""Longest arrival span (~32 years): later times lose the sub-microsecond resolution spans need."""


@dataclass(frozen=True)
class Workload:
    """A sorted-by-arrival set of requests, stored as columns."""

    name: str
    arrival_s: np.ndarray          # float64, non-decreasing, starts at the first arrival
    prompt_tokens: np.ndarray      # int64, >= 1
    output_tokens: np.ndarray      # int64, >= 1
    prefix_hashes: Optional[list[tuple[int, ...]]] = None
    prefix_block_tokens: int = 512
    max_tokens: Optional[np.ndarray] = None
    source: dict = field(default_factory=dict)
    """Where it came from (file, generator and its parameters, scaling) — stamped on results."""

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def requests(self) -> Iterator[Request]:
        """Yield the requests in arrival order, ids ``0..n-1`` (columns turned into Python
        values 64k rows at a time: ten million requests never exist as objects at once).

        Every step runs in C: ``zip`` makes each request's row and ``tuple.__new__`` makes it a
        :class:`Request`. A NamedTuple's own ``__new__`` is interpreted Python: called from a
        generator resumed per request, making the requests was 4% of a run's instructions.
        """
        return chain.from_iterable(map(self._chunk, range(0, len(self), REQUEST_CHUNK)))

    def _chunk(self, lo: int) -> Iterator[Request]:
        """Requests ``lo`` up to ``lo + REQUEST_CHUNK``, made as they are read."""
        hi = min(lo + REQUEST_CHUNK, len(self))
        hashes = self.prefix_hashes[lo:hi] if self.prefix_hashes is not None else repeat(None)
        max_tokens = self.max_tokens[lo:hi].tolist() if self.max_tokens is not None else repeat(None)
        rows = zip(range(lo, hi), self.arrival_s[lo:hi].tolist(), self.prompt_tokens[lo:hi].tolist(),
                   self.output_tokens[lo:hi].tolist(), hashes, repeat(self.prefix_block_tokens), max_tokens,
                   repeat(None))                                   # every field, in Request's order
        return map(tuple.__new__, repeat(Request), rows)


# --------------------------------------------------------------------------------------------
# Length distributions
# --------------------------------------------------------------------------------------------

_LENGTH_KINDS = {"constant": ("tokens",), "uniform": ("low", "high"),
                 "lognormal": ("mean", "sigma"), "empirical": ("probs", "tokens")}


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: a small, hashable spec that samples vectorized.

    ``kind`` is ``constant`` (``tokens``), ``uniform`` (``low``..``high`` inclusive),
    ``lognormal`` (arithmetic ``mean`` in tokens and log-space ``sigma``) or ``empirical``
    (an inverse-CDF table ``probs`` → ``tokens``, linearly interpolated). Samples are rounded,
    clamped to >= 1 token and, if ``cap_tokens`` is set, to at most that.
    """

    kind: str
    params: tuple[tuple[str, Any], ...]
    cap_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in _LENGTH_KINDS:
            raise UserError(f"length distribution: unknown kind {self.kind!r} "
                            f"(one of {', '.join(_LENGTH_KINDS)})")
        missing = [k for k in _LENGTH_KINDS[self.kind] if k not in dict(self.params)]
        if missing:
            raise UserError(f"length distribution {self.kind}: missing parameter {missing[0]!r}")
        cap = self.cap_tokens
        if cap is not None and not (_is_number(cap, integer=True) and 1 <= cap <= MAX_TOKENS):
            raise UserError(f"length distribution: cap_tokens must be an integer in 1..{MAX_TOKENS}, got {cap!r}")
        p = dict(self.params)
        for k in _LENGTH_KINDS[self.kind]:
            values = p[k] if self.kind == "empirical" else (p[k],)
            integer = k in ("low", "high") or (k == "tokens" and self.kind == "constant")
            if not isinstance(values, (tuple, list)) or not all(
                    _is_number(v, integer) and abs(v) <= MAX_TOKENS for v in values):
                what = "a list of numbers" if self.kind == "empirical" else "an integer" if integer else "a number"
                raise UserError(f"length distribution {self.kind}: {k} must be {what} "
                                f"up to {MAX_TOKENS:,}, got {p[k]!r}")
        bad = {"constant": lambda: p["tokens"] < 1,
               "uniform": lambda: not 1 <= p["low"] <= p["high"],
               "lognormal": lambda: p["mean"] <= 0 or p["sigma"] < 0,
               "empirical": lambda: len(p["probs"]) != len(p["tokens"]) or len(p["probs"]) < 2
               or p["probs"][0] != 0.0 or p["probs"][-1] != 1.0
               or any(np.diff(p["probs"]) <= 0) or any(np.diff(p["tokens"]) < 0)}[self.kind]()
        if bad:
            raise UserError(f"length distribution {self.kind}: invalid parameters {self.describe()}")

    @classmethod
    def constant(cls, tokens: int) -> "LengthDist":
        """Every request has exactly ``tokens`` tokens."""
        return cls("constant", (("tokens", int(tokens)),))

    @classmethod
    def uniform(cls, low: int, high: int) -> "LengthDist":
        """Integers uniform on ``low..high`` inclusive."""
        return cls("uniform", (("low", int(low)), ("high", int(high))))

    @classmethod
    def lognormal(cls, mean: float, sigma: float, cap_tokens: Optional[int] = None) -> "LengthDist":
        """Lognormal with arithmetic mean ``mean`` tokens and log-space std ``sigma``."""
        return cls("lognormal", (("mean", float(mean)), ("sigma", float(sigma))), cap_tokens)

    @classmethod
    def empirical(cls, probs: Sequence[float], tokens: Sequence[float],
                  cap_tokens: Optional[int] = None, name: Optional[str] = None) -> "LengthDist":
        """Inverse-CDF table: quantile ``probs`` (0 → 1) and their token counts."""
        try:
            params: tuple[tuple[str, Any], ...] = (("probs", tuple(float(x) for x in probs)),
                                                    ("tokens", tuple(float(x) for x in tokens)))
        except (TypeError, ValueError):
            raise UserError(f"length distribution empirical: probs and tokens must be lists of "
                            f"numbers, got {probs!r} and {tokens!r}") from None
        if name is not None:
            params += (("name", name),)
        return cls("empirical", params, cap_tokens)

    @classmethod
    def fit(cls, samples: np.ndarray, kind: str = "empirical",
            cap_tokens: Optional[int] = None) -> "LengthDist":
        """Fit a lognormal (moments of log-lengths) or a quantile table to observed lengths."""
        x = np.asarray(samples, dtype=np.float64)
        if x.size == 0 or np.any(x < 1):
            raise UserError("LengthDist.fit: need a non-empty sample of lengths >= 1")
        if kind == "lognormal":
            logs = np.log(x)
            mu, sigma = float(logs.mean()), float(logs.std())
            return cls.lognormal(math.exp(mu + sigma * sigma / 2), sigma, cap_tokens)
        if kind == "empirical":
            probs = _QUANTILE_PROBS
            return cls.empirical(probs, np.round(np.quantile(x, probs), 1), cap_tokens)
        raise UserError(f"LengthDist.fit: kind must be 'lognormal' or 'empirical', got {kind!r}")

    @classmethod
    def named(cls, name: str, role: str, fit: str = "empirical",
              cap_tokens: Optional[int] = None) -> "LengthDist":
        """A default shipped in the package (``azure-conv``, ``mooncake-conv``) for ``role``
        ``prompt`` or ``output``; ``fit`` picks its quantile table or its lognormal fit."""
        summary = load_length_summary(name)
        if role not in ("prompt", "output"):
            raise UserError(f"length distribution {name}: role must be 'prompt' or 'output'")
        part = summary[role]
        if fit == "lognormal":
            return cls.lognormal(part["lognormal"]["mean"], part["lognormal"]["sigma"], cap_tokens)
        if fit == "empirical":
            q = part["quantiles"]
            return cls.empirical(q["probs"], q["tokens"], cap_tokens, name=f"{name}:{role}")
        raise UserError(f"length distribution {name}: fit must be 'empirical' or 'lognormal'")

    def get(self, name: str) -> Any:
        """One parameter by name."""
        return dict(self.params)[name]

    def describe(self) -> dict[str, Any]:
        """A short JSON-able description for stamping results (tables abbreviated by name)."""
        p = dict(self.params)
        if self.kind == "empirical":
            p = {"name": p.get("name"), "points": len(p["probs"])}
        return {"kind": self.kind, **p, "cap_tokens": self.cap_tokens}

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` lengths as int64, each >= 1 (and <= ``cap_tokens`` if set)."""
        p = dict(self.params)
        if self.kind == "constant":
            x = np.full(n, p["tokens"], dtype=np.float64)
        elif self.kind == "uniform":
            x = rng.integers(p["low"], p["high"] + 1, size=n).astype(np.float64)
        elif self.kind == "lognormal":
            sigma = p["sigma"]
            x = rng.lognormal(math.log(p["mean"]) - sigma * sigma / 2, sigma, size=n)
        else:
            x = np.interp(rng.random(n), p["probs"], p["tokens"])
        if self.cap_tokens is None and n and not x.max() <= MAX_TOKENS:
            raise UserError(f"length distribution {self.describe()}: samples exceed {MAX_TOKENS:,} "
                            f"tokens; set cap_tokens or narrower parameters")
        np.rint(x, out=x)
        np.clip(x, 1, self.cap_tokens if self.cap_tokens is not None else None, out=x)
        return x.astype(np.int64)


def _is_number(v: Any, integer: bool = False) -> bool:
    """A finite real (an integral one if ``integer``), not a bool."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(v) and (not integer or float(v).is_integer())


_QUANTILE_PROBS: tuple[float, ...] = tuple(
    [i / 100 for i in range(100)] + [0.995, 0.999, 1.0])
"""Percentiles 0..99 plus a finer tail: enough to keep means within ~1% of the trace."""

LengthSpec = Union[LengthDist, int, str, Mapping[str, Any]]


def length_dist(spec: LengthSpec, role: str = "prompt") -> LengthDist:
    """Turn a config value into a :class:`LengthDist`.

    An int is a constant; a string names a shipped default (``"azure-conv"``, optionally
    ``"azure-conv:lognormal"``); a mapping is ``{kind: ..., <params>, cap_tokens: ...}``.
    """
    if isinstance(spec, LengthDist):
        return spec
    if isinstance(spec, bool):
        raise UserError(f"{role} length: expected a number, name or mapping, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return LengthDist.constant(int(spec))
    if isinstance(spec, str):
        name, _, fit = spec.partition(":")
        return LengthDist.named(name, role, fit or "empirical")
    if isinstance(spec, Mapping):
        d = dict(spec)
        kind = d.pop("kind", None)
        cap = d.pop("cap_tokens", None)
        if kind is None:
            raise UserError(f"{role} length: mapping needs a 'kind'")
        if kind == "named":
            return LengthDist.named(d.pop("name", ""), role, d.pop("fit", "empirical"), cap)
        if kind == "empirical":
            return LengthDist.empirical(d.get("probs", ()), d.get("tokens", ()), cap)
        expected = _LENGTH_KINDS.get(kind, ())
        extra = sorted(set(d) - set(expected))
        if extra:
            raise UserError(f"{role} length: unknown parameter {extra[0]!r} for kind {kind!r}")
        return LengthDist(kind, tuple((k, d[k]) for k in expected if k in d), cap)
    raise UserError(f"{role} length: expected a number, name or mapping, got {spec!r}")


def available_length_dists() -> list[str]:
    """Names of the length distributions shipped in ``hetero_sched/data/lengths_*.json``."""
    files = resources.files("hetero_sched").joinpath("data").iterdir()
    return sorted(f.name[len("lengths_"):-len(".json")] for f in files
                  if f.name.startswith("lengths_") and f.name.endswith(".json"))


def load_length_summary(name: str) -> dict[str, Any]:
    """The shipped summary for ``name`` (quantiles, lognormal fit, citation, license)."""
    f = resources.files("hetero_sched").joinpath("data", f"lengths_{name}.json")
    if not f.is_file():
        raise UserError(f"unknown length distribution {name!r} "
                        f"(shipped: {', '.join(available_length_dists())})")
    result: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    return result


def fit_length_summary(w: Workload, *, name: str, trace: str, citation: str,
                       license: str) -> dict[str, Any]:
    """Summarize a trace's lengths (and arrivals) as the JSON shipped in ``data/``.

    Only fitted statistics leave the trace: a ~100-point quantile table and lognormal
    parameters per role, so the package carries no trace rows.
    """
    def part(x: np.ndarray) -> dict[str, Any]:
        logs = np.log(x.astype(np.float64))
        mu, sigma = float(logs.mean()), float(logs.std())
        return {"mean": round(float(x.mean()), 2),
                "p50": float(np.quantile(x, 0.5)), "p99": round(float(np.quantile(x, 0.99)), 1),
                "min": int(x.min()), "max": int(x.max()),
                "lognormal": {"mu": round(mu, 6), "sigma": round(sigma, 6),
                              "mean": round(math.exp(mu + sigma * sigma / 2), 3)},
                "quantiles": {"probs": list(_QUANTILE_PROBS),
                              "tokens": [round(float(v), 1)
                                         for v in np.quantile(x, _QUANTILE_PROBS)]}}
    return {"name": name,
            "about": "Fitted summary of a public trace's prompt/output lengths; sample with "
                     "LengthDist.named(name, role). Prompt and output are sampled independently.",
            "source": {"trace": trace, "rows": len(w), "citation": citation, "license": license,
                       "changes": "reduced to quantiles and lognormal fits; no rows included",
                       "fitted_by": "hetero_sched.workload.fit_length_summary"},
            "arrival": {"mean_rate_per_s": round(mean_rate_per_s(w), 4),
                        "interarrival_cv": round(interarrival_cv(w), 4)},
            "prompt": part(w.prompt_tokens), "output": part(w.output_tokens)}


# --------------------------------------------------------------------------------------------
# Synthetic workloads
# --------------------------------------------------------------------------------------------

def synthetic_arrivals(n: int, rate_per_s: float, *, arrival: str = "poisson", cv: float = 1.0,
                       rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times starting at 0 whose inter-arrival mean is ``1 / rate_per_s``.

    ``poisson``: exponential gaps; ``gamma``: gamma gaps with coefficient of variation ``cv``
    (cv = 1 is Poisson, > 1 burstier); ``constant``: evenly spaced.
    """
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise UserError(f"synthetic workload: rate_per_s must be > 0, got {rate_per_s}")
    if arrival == "poisson":
        if cv != 1.0:
            raise UserError("synthetic workload: cv applies to arrival='gamma' (poisson has cv 1)")
        gaps = rng.exponential(1.0 / rate_per_s, size=n - 1)
    elif arrival == "gamma":
        shape = 1.0 / (cv * cv) if cv * cv > 0 else math.inf  # cv * cv may under/overflow
        scale = 1.0 / (rate_per_s * shape) if rate_per_s * shape > 0 else math.inf
        if not (cv > 0 and 0 < shape < math.inf and 0 < scale < math.inf):
            raise UserError(f"synthetic workload: cv {cv} is out of range for gamma arrivals "
                            f"at rate_per_s {rate_per_s}")
        gaps = rng.gamma(shape, scale, size=n - 1)
    elif arrival == "constant":
        gaps = np.full(n - 1, 1.0 / rate_per_s)
    else:
        raise UserError(f"synthetic workload: arrival must be poisson, gamma or constant, "
                        f"got {arrival!r}")
    out = np.empty(n, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(gaps, out=out[1:])
    return out


def synthetic(n: int, rate_per_s: float, *, arrival: str = "poisson", cv: float = 1.0,
              prompt: LengthSpec = "azure-conv", output: LengthSpec = "azure-conv",
              seed: int = 0, name: Optional[str] = None) -> Workload:
    """A seeded synthetic workload of ``n`` requests; same arguments → identical arrays."""
    if not 1 <= n <= MAX_REQUESTS:
        raise UserError(f"synthetic workload: n must be in 1..{MAX_REQUESTS:,}, got {n}")
    prompt_dist, output_dist = length_dist(prompt, "prompt"), length_dist(output, "output")
    rng = np.random.default_rng(seed)
    arrivals = synthetic_arrivals(n, rate_per_s, arrival=arrival, cv=cv, rng=rng)
    source = {"format": "synthetic", "rows": n, "rate_per_s": rate_per_s, "arrival": arrival,
              "cv": cv, "prompt": prompt_dist.describe(), "output": output_dist.describe(),
              "seed": seed, "transforms": []}
    return _workload(name or f"synthetic-{arrival}", arrivals, prompt_dist.sample(rng, n),
                     output_dist.sample(rng, n), source=source)


def _workload(name: str, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray, *,
              hashes: Optional[list[tuple[int, ...]]] = None, block_tokens: int = 512,
              max_tokens: Optional[np.ndarray] = None, source: dict[str, Any]) -> Workload:
    span_s = float(arrival_s[-1] - arrival_s[0]) if arrival_s.size else 0.0
    if not span_s <= MAX_SPAN_S:
        what = f"{source['path']}: timestamps" if "path" in source else f"workload {name!r}: arrivals"
        raise UserError(f"{what} span {span_s:.6g} s, more than {MAX_SPAN_S:.0e} s "
                        f"(is a time unit, rate_per_s or rate_scale out of range?)")
    arrays = [arrival_s, prompt, output] + ([max_tokens] if max_tokens is not None else [])
    for a in arrays:  # shared between a workload and its transforms: nobody may write
        a.flags.writeable = False
    return Workload(name, arrival_s, prompt, output, hashes, block_tokens, max_tokens, source)


# --------------------------------------------------------------------------------------------
# Statistics and transforms (each returns a new Workload; ``source`` records what was done)
# --------------------------------------------------------------------------------------------

def mean_rate_per_s(w: Workload) -> float:
    """Requests per second over the trace: (n - 1) / (last arrival - first arrival)."""
    span = float(w.arrival_s[-1] - w.arrival_s[0]) if len(w) else 0.0
    if len(w) < 2 or span <= 0:
        raise UserError(f"workload {w.name!r}: a rate needs >= 2 requests at distinct times")
    return (len(w) - 1) / span


def interarrival_cv(w: Workload) -> float:
    """Coefficient of variation of inter-arrival gaps (1 for Poisson)."""
    gaps = np.diff(w.arrival_s)
    if gaps.size < 2 or gaps.mean() <= 0:
        raise UserError(f"workload {w.name!r}: a CV needs >= 3 requests at distinct times")
    return float(gaps.std() / gaps.mean())


def _derive(w: Workload, op: dict[str, Any], *, keep: Optional[np.ndarray | slice] = None,
            arrival_s: Optional[np.ndarray] = None) -> Workload:
    idx: np.ndarray | slice = keep if keep is not None else slice(None)
    arr = arrival_s if arrival_s is not None else w.arrival_s[idx]
    hashes = w.prefix_hashes
    if hashes is not None and keep is not None:
        hashes = hashes[idx] if isinstance(idx, slice) else [hashes[i] for i in idx]
    source = {**w.source, "rows": int(arr.shape[0]),
              "transforms": [*w.source.get("transforms", []), op]}
    return _workload(w.name, arr, w.prompt_tokens[idx], w.output_tokens[idx], hashes=hashes,
                     block_tokens=w.prefix_block_tokens,
                     max_tokens=w.max_tokens[idx] if w.max_tokens is not None else None,
                     source=source)


def scale_rate(w: Workload, factor: float) -> Workload:
    """Speed arrivals up by ``factor`` (2 → twice the request rate); order and lengths kept."""
    if not factor > 0 or not math.isfinite(factor):
        raise UserError(f"scale_rate: factor must be > 0, got {factor}")
    start = w.arrival_s[0]
    with np.errstate(over="ignore"):  # a tiny factor overflows to inf, which _workload reports
        return _derive(w, {"op": "scale_rate", "factor": factor},
                       arrival_s=start + (w.arrival_s - start) / factor)


def scale_to_rate(w: Workload, rate_per_s: float) -> Workload:
    """Rescale inter-arrival times so :func:`mean_rate_per_s` is ``rate_per_s``.

    This is how goodput searches replay a real trace at other loads: the burst pattern is kept,
    only the clock is stretched.
    """
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise UserError(f"scale_to_rate: rate_per_s must be > 0, got {rate_per_s}")
    factor = rate_per_s / mean_rate_per_s(w)
    start = w.arrival_s[0]
    with np.errstate(over="ignore"):  # as in scale_rate
        return _derive(w, {"op": "scale_to_rate", "rate_per_s": rate_per_s, "factor": factor},
                       arrival_s=start + (w.arrival_s - start) / factor)


def head(w: Workload, n: int) -> Workload:
    """The first ``n`` requests (all of them if there are fewer)."""
    if n < 1:
        raise UserError(f"head: n must be >= 1, got {n}")
    return _derive(w, {"op": "head", "n": n}, keep=slice(0, n))


def window(w: Workload, start_s: float, end_s: float) -> Workload:
    """Requests arriving in ``[start_s, end_s)``, re-based so the first of them arrives at 0."""
    if not end_s > start_s:
        raise UserError(f"window: end_s ({end_s}) must be after start_s ({start_s})")
    lo, hi = np.searchsorted(w.arrival_s, [start_s, end_s], side="left")
    if hi <= lo:
        raise UserError(f"window [{start_s}, {end_s}) s of {w.name!r} holds no requests "
                        f"(trace spans 0 to {float(w.arrival_s[-1]):.3f} s)")
    arr = w.arrival_s[lo:hi] - w.arrival_s[lo]
    return _derive(w, {"op": "window", "start_s": start_s, "end_s": end_s,
                       "offset_s": float(w.arrival_s[lo])}, keep=slice(int(lo), int(hi)),
                   arrival_s=arr)


# --------------------------------------------------------------------------------------------
# Trace readers
# --------------------------------------------------------------------------------------------

ZeroLengths = Literal["error", "clamp", "drop"]
"""What to do with a 0-token prompt or output: stop with an error (default), count and raise it
to 1 token (``clamp``), or count and skip the row (``drop``). Negative lengths always error."""

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
_CANONICAL = {"arrival": "arrival_s", "prompt": "prompt_tokens", "output": "output_tokens"}
_AZURE = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}
_MOONCAKE = {"arrival": "timestamp", "prompt": "input_length", "output": "output_length",
             "hashes": "hash_ids"}

Where = Callable[[int], str]
"""Maps a 0-based data-row index to its place in the file (``line 17``, ``row 3``)."""


def _fail(path: str | Path, where: str, message: str) -> NoReturn:
    raise UserError(f"{path} {where}: {message}" if where else f"{path}: {message}")


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _read_csv(path: Path, columns: list[str]) -> tuple[dict[str, np.ndarray], Where]:
    """Columns by pyarrow (fast); on any problem, the csv module finds the exact line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next((row for row in reader if row), None)
        header_line = reader.line_num
    if header is None:
        _fail(path, "", "empty file")
    missing = [c for c in columns if c not in header]
    if missing:
        _fail(path, f"line {header_line}",
              f"missing column {missing[0]!r} (header has: {', '.join(header)})")

    def record_lines() -> list[int]:
        lines = []
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            start, seen_header = 1, False
            for row in reader:
                if row and seen_header:
                    if len(row) != len(header):
                        _fail(path, f"line {start}",
                              f"expected {len(header)} fields, found {len(row)}")
                    lines.append(start)
                seen_header = seen_header or bool(row)
                start = reader.line_num + 1
        return lines

    cache: list[list[int]] = []

    def where(i: int) -> str:
        if not cache:
            cache.append(record_lines())
        return f"line {cache[0][i]}"

    opts = pacsv.ConvertOptions(include_columns=columns, null_values=[],
                                strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        record_lines()  # raises with the line if a row is ragged
        _fail(path, "", f"cannot parse CSV: {str(exc).splitlines()[0]}")
    if table.num_rows == 0:
        _fail(path, "", "no data rows")
    return {c: table.column(c).to_numpy() for c in columns}, where


def _read_jsonl(path: Path, columns: list[str]) -> tuple[dict[str, np.ndarray], Where]:
    """One JSON object per line; blank lines are skipped (and still counted)."""
    values: dict[str, list[Any]] = {c: [] for c in columns}
    lines: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                _fail(path, f"line {lineno}", f"not valid JSON ({exc.msg})")
            if not isinstance(obj, dict):
                _fail(path, f"line {lineno}", "expected a JSON object per line")
            for c in columns:
                if c not in obj:
                    _fail(path, f"line {lineno}", f"missing field {c!r}")
                values[c].append(obj[c])
            lines.append(lineno)
    if not lines:
        _fail(path, "", "empty file")
    out = {}
    for c, vs in values.items():
        arr = np.empty(len(vs), dtype=object)  # lists (hashes) and mixed types stay objects
        arr[:] = vs
        if set(map(type, vs)) <= {int, float}:  # the common case: plain numbers, vectorized
            arr = np.array(vs)
        out[c] = arr
    return out, lambda i: f"line {lines[i]}"


def _read_parquet(path: Path, columns: list[str]) -> tuple[dict[str, np.ndarray], Where]:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            _fail(path, "", f"missing column {missing[0]!r} (columns: {', '.join(names)})")
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        _fail(path, "", f"cannot read Parquet: {str(exc).splitlines()[0]}")
    if table.num_rows == 0:
        _fail(path, "", "no data rows")
    out = {}
    for c in columns:
        col = table.column(c)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or col.null_count:
            arr = np.empty(len(col), dtype=object)
            arr[:] = col.to_pylist()
            out[c] = arr
        else:
            out[c] = col.to_numpy()
    return out, lambda i: f"row {i + 1}"


_READERS: dict[str, Callable[[Path, list[str]], tuple[dict[str, np.ndarray], Where]]] = {
    "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}


def _tokens(values: np.ndarray, field: str, path: Path, where: Where) -> np.ndarray:
    """Validated int64 token counts (>= 0; zeros are handled by the caller's policy)."""
    kind = values.dtype.kind
    if kind in "iu":
        x = values.astype(np.int64)
    elif kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.floor(values)))
        if bad.size:
            _fail(path, where(int(bad[0])), f"{field} {_py(values[bad[0]])!r} is not an integer")
        big = np.flatnonzero(values > MAX_TOKENS)
        if big.size:  # before the int64 cast, which would wrap
            _fail(path, where(int(big[0])), f"{field} {_py(values[big[0]])!r} is more than {MAX_TOKENS:,} tokens")
        x = np.maximum(values, -MAX_TOKENS - 1).astype(np.int64)
    else:
        x = np.empty(values.shape[0], dtype=np.int64)
        for i, v in enumerate(values):
            if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
                if abs(int(v)) >= 2**62:
                    _fail(path, where(i), f"{field} {_py(v)!r} is too large")
                x[i] = v
            elif isinstance(v, float) and v.is_integer():
                x[i] = int(v)
            elif isinstance(v, str) and v.strip().lstrip("+-").isdigit() and len(v) < 18:
                x[i] = int(v)
            else:
                _fail(path, where(i), f"{field} {_py(v)!r} is not an integer")
    neg = np.flatnonzero(x < 0)
    if neg.size:
        _fail(path, where(int(neg[0])), f"{field} {int(x[neg[0]])} is negative")
    big = np.flatnonzero(x > MAX_TOKENS)
    if big.size:
        _fail(path, where(int(big[0])), f"{field} {int(x[big[0]])} is more than {MAX_TOKENS:,} tokens")
    return x


def _times(values: np.ndarray, field: str, time_unit: str, path: Path,
           where: Where) -> np.ndarray:
    """Arrival times in seconds (numbers in ``time_unit``, or datetimes relative to row 0)."""
    kind = values.dtype.kind
    if kind in "OU":
        first = values[0]
        numeric = isinstance(first, (int, float)) and not isinstance(first, bool)
        if isinstance(first, str):
            try:
                float(first)
                numeric = True
            except ValueError:
                numeric = False
        parse: Callable[[Any], Any] = float if numeric else np.datetime64
        for i, v in enumerate(values):
            try:
                if isinstance(v, bool) or v is None:
                    raise ValueError
                parse(v)
            except (ValueError, TypeError):
                _fail(path, where(i), f"{field} {_py(v)!r} is not a "
                                      f"{'number' if numeric else 'date/time'}")
        values = values.astype(np.float64 if numeric else "datetime64[ns]")
        kind = values.dtype.kind
    if kind == "M":
        ns = values.astype("datetime64[ns]").astype(np.int64)
        nat = np.flatnonzero(np.isnat(values))
        if nat.size:
            _fail(path, where(int(nat[0])), f"{field} is missing")
        return (ns - ns[0]).astype(np.float64) / 1e9
    if kind in "iuf":
        x = values.astype(np.float64) * _TIME_UNITS[time_unit]
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            _fail(path, where(int(bad[0])), f"{field} {_py(values[bad[0]])!r} is not a number")
        return x
    _fail(path, where(0), f"{field} {_py(values[0])!r} is not a time")


def _hash_tuples(values: np.ndarray, field: str, path: Path,
                 where: Where) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, v in enumerate(values):
        if isinstance(v, str):  # CSV: "1 2 3", "1,2,3" or "[1, 2, 3]"
            parts = v.strip().strip("[]").replace(",", " ").replace(";", " ").split()
            if not all(p.lstrip("-").isdigit() for p in parts):
                _fail(path, where(i), f"{field} {v!r} is not a list of integers")
            out.append(tuple(int(p) for p in parts))
        elif isinstance(v, (list, tuple)) and set(map(type, v)) <= {int}:
            out.append(tuple(v))
        elif isinstance(v, np.ndarray) and v.dtype.kind in "iu":
            out.append(tuple(v.tolist()))
        else:
            _fail(path, where(i), f"{field} {_py(v)!r} is not a list of integers")
    return out


def _spread_buckets(arrival_s: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Spread requests sharing a bucketed timestamp uniformly over their bucket, keeping file
    order; a bucket lasts until the next one (the last one: the median bucket)."""
    starts, counts = np.unique(arrival_s, return_counts=True)
    widths = np.diff(starts)
    median = float(np.median(widths)) if widths.size else 0.0
    widths = np.append(widths, median)
    bucket = np.repeat(np.arange(starts.size), counts)
    u = rng.random(arrival_s.shape[0])
    u = u[np.lexsort((u, bucket))]  # sorted within each (contiguous) bucket
    return starts[bucket] + widths[bucket] * u, median


def read_table(path: str | Path, *, arrival: str, prompt: str, output: str,
               hashes: Optional[str] = None, max_tokens: Optional[str] = None,
               time_unit: str = "s", fmt: str = "auto", prefix_block_tokens: int = 512,
               sort: bool = False, zero_lengths: ZeroLengths = "error",
               name: Optional[str] = None) -> Workload:
    """Read a CSV, JSONL or Parquet trace through a column mapping.

    ``arrival`` holds numbers in ``time_unit`` or date/times; arrivals are re-based to the
    first request. Rows must be in arrival order unless ``sort=True`` (a stable sort). Any bad
    value raises a one-line :class:`UserError` naming file, line (Parquet: row) and field.
    """
    return _read(path, fmt=fmt, cols={"arrival": arrival, "prompt": prompt, "output": output,
                                      "hashes": hashes, "max_tokens": max_tokens},
                 time_unit=time_unit, prefix_block_tokens=prefix_block_tokens, sort=sort,
                 zero_lengths=zero_lengths, name=name, label=None, spread_seed=None)


def read_azure_csv(path: str | Path, *, sort: bool = False,
                   zero_lengths: ZeroLengths = "error") -> Workload:
    """The Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    return _read(path, fmt="csv", cols=dict(_AZURE), time_unit="s", prefix_block_tokens=512,
                 sort=sort, zero_lengths=zero_lengths, name=None, label="azure-csv",
                 spread_seed=None)


def read_mooncake_jsonl(path: str | Path, *, spread_buckets: bool = True, seed: int = 0,
                        sort: bool = False, zero_lengths: ZeroLengths = "error") -> Workload:
    """A Mooncake trace (timestamp ms, input_length, output_length, hash_ids of 512-token
    prefix blocks). Its timestamps come in ~3 s buckets; ``spread_buckets`` spreads each
    bucket's requests uniformly (seeded) so arrivals are not artificial bursts."""
    return _read(path, fmt="jsonl", cols=dict(_MOONCAKE), time_unit="ms",
                 prefix_block_tokens=512, sort=sort, zero_lengths=zero_lengths, name=None,
                 label="mooncake-jsonl", spread_seed=seed if spread_buckets else None)


def _read(path: str | Path, *, fmt: str, cols: dict[str, Optional[str]], time_unit: str,
          prefix_block_tokens: int, sort: bool, zero_lengths: str, name: Optional[str],
          label: Optional[str], spread_seed: Optional[int]) -> Workload:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such trace file")
    if fmt == "auto":
        fmt = _EXTENSIONS.get(path.suffix.lower(), "")
    if fmt not in _READERS:
        raise UserError(f"{path}: unknown trace format (name it .csv, .jsonl or .parquet, "
                        f"or set format: csv, jsonl or parquet)")
    if time_unit not in _TIME_UNITS:
        raise UserError(f"{path}: time_unit must be one of {', '.join(_TIME_UNITS)}")
    if zero_lengths not in ("error", "clamp", "drop"):
        raise UserError(f"{path}: zero_lengths must be error, clamp or drop")
    mapping = {k: v for k, v in cols.items() if v is not None}
    try:
        raw, where = _READERS[fmt](path, list(dict.fromkeys(mapping.values())))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); is it really {fmt}?") from None

    arrival = _times(raw[mapping["arrival"]], mapping["arrival"], time_unit, path, where)
    lengths = {k: _tokens(raw[mapping[k]], mapping[k], path, where)
               for k in ("prompt", "output", "max_tokens") if k in mapping}
    hash_list = (_hash_tuples(raw[mapping["hashes"]], mapping["hashes"], path, where)
                 if "hashes" in mapping else None)
    n_read = arrival.shape[0]
    source: dict[str, Any] = {"path": str(path), "format": label or fmt, "rows_read": n_read,
                              "columns": mapping, "time_unit": time_unit}

    zero_max = np.flatnonzero(lengths["max_tokens"] == 0) if "max_tokens" in lengths else []
    if len(zero_max):
        _fail(path, where(int(zero_max[0])), f"{mapping['max_tokens']} is 0 (must be >= 1)")
    zero = {k: lengths[k] == 0 for k in ("prompt", "output")}
    keep: Optional[np.ndarray] = None
    either = zero["prompt"] | zero["output"]
    if zero_lengths == "error" and either.any():
        i = int(np.argmax(either))
        _fail(path, where(i), f"{mapping['prompt' if zero['prompt'][i] else 'output']} is 0 "
                              f"(a request needs >= 1 token; set zero_lengths: clamp or drop to "
                              f"accept such rows)")
    source["zero_lengths"] = zero_lengths
    source["zero_rows"] = {k: int(m.sum()) for k, m in zero.items()}
    if zero_lengths == "clamp":
        for k in ("prompt", "output"):
            lengths[k] = np.maximum(lengths[k], 1)
    elif zero_lengths == "drop":
        keep = ~either

    back = np.flatnonzero(np.diff(arrival) < 0)
    if back.size and not sort:
        i = int(back[0]) + 1
        _fail(path, where(i), f"{mapping['arrival']} goes back in time by "
                              f"{arrival[i - 1] - arrival[i]:.6g} s ({back.size} such rows; rows "
                              f"must be in arrival order, or set sort: true)")
    order = np.argsort(arrival, kind="stable") if back.size else None
    source["sorted"] = bool(back.size)
    if keep is not None or order is not None:
        idx = np.arange(n_read) if order is None else order
        if keep is not None:
            idx = idx[keep[idx]]
        if idx.size == 0:
            _fail(path, "", "no rows left after dropping zero-length rows")
        arrival = arrival[idx]
        lengths = {k: v[idx] for k, v in lengths.items()}
        hash_list = [hash_list[i] for i in idx] if hash_list is not None else None
    source["dropped_rows"] = int(n_read - arrival.shape[0])

    if spread_seed is not None:
        arrival, bucket_s = _spread_buckets(arrival, np.random.default_rng(spread_seed))
        source.update(spread_buckets=True, seed=spread_seed, bucket_s=bucket_s)
    source["rebased_by_s"] = float(arrival[0])  # datetimes: seconds after the first row's
    arrival = arrival - arrival[0]
    source["rows"] = int(arrival.shape[0])
    source["transforms"] = []
    return _workload(name or path.stem, arrival, lengths["prompt"], lengths["output"],
                     hashes=hash_list, block_tokens=prefix_block_tokens,
                     max_tokens=lengths.get("max_tokens"), source=source)


_COMMON_OPTIONS = ("sort", "zero_lengths")
_FORMAT_OPTIONS = {
    "azure": _COMMON_OPTIONS,
    "mooncake": (*_COMMON_OPTIONS, "spread_buckets", "seed"),
    "generic": (*_COMMON_OPTIONS, "arrival", "prompt", "output", "hashes", "max_tokens", "time_unit",
                "prefix_block_tokens", "name"),
}
"""Reader options each kind of trace takes (an experiment's ``workload`` fields of the same names;
the column mapping is its ``columns``)."""
_TITLES = {"azure": "an Azure trace", "mooncake": "a Mooncake trace", "generic": "a generic CSV/JSONL/Parquet trace"}


def load_trace(path: str | Path, fmt: str = "auto", **options: Any) -> Workload:
    """Read a trace, recognizing Azure CSV, Mooncake JSONL or canonical columns (``arrival_s``
    or ``arrival_ms``, ``prompt_tokens``, ``output_tokens``); ``options`` go to the reader
    (:data:`_FORMAT_OPTIONS`: a column mapping and ``time_unit`` for a generic trace, ...)."""
    path = Path(path)
    if fmt not in ("auto", "azure", "mooncake", *_READERS):
        raise UserError(f"{path}: unknown trace format {fmt!r} (format: auto, azure, mooncake, csv, jsonl or parquet)")
    kind = fmt if fmt in ("azure", "mooncake") else "generic"
    if fmt == "auto":
        fmt = _EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise UserError(f"{path}: unknown trace format (name it .csv, .jsonl or .parquet, or set "
                            f"format: azure, mooncake, csv, jsonl or parquet)")
        if not {"arrival", "prompt", "output"} & set(options) and path.is_file():
            names = _column_names(path, fmt)
            if set(_AZURE.values()) <= names:
                kind = "azure"
            elif set(_MOONCAKE.values()) <= names:
                kind = "mooncake"
            elif not {"arrival_s", "arrival_ms"} & names or not {"prompt_tokens", "output_tokens"} <= names:
                raise UserError(f"{path}: unknown trace columns ({', '.join(sorted(names))}); map them with "
                                f"columns: {{arrival: ..., prompt: ..., output: ...}}")
            elif "arrival_s" not in names:
                options = {"arrival": "arrival_ms", "time_unit": "ms", **options}
    stray = sorted(set(options) - set(_FORMAT_OPTIONS[kind]))
    if stray:
        what = "columns" if stray[0] in ("arrival", "prompt", "output", "hashes", "max_tokens") else stray[0]
        raise UserError(f"{path}: {what} does not apply to {_TITLES[kind]} (it applies to "
                        f"{', '.join(_TITLES[k] for k, opts in _FORMAT_OPTIONS.items() if stray[0] in opts)})")
    if kind == "azure":
        return read_azure_csv(path, **options)
    if kind == "mooncake":
        return read_mooncake_jsonl(path, **options)
    return read_table(path, fmt=fmt, **{**_CANONICAL, **options})


def _column_names(path: Path, fmt: str) -> set[str]:
    try:
        if fmt == "parquet":
            return set(pq.ParquetFile(path).schema_arrow.names)
        with open(path, newline="", encoding="utf-8-sig") as f:
            for text in f:
                if text.strip():
                    if fmt == "csv":
                        return set(next(csv.reader([text])))
                    obj = json.loads(text)
                    return set(obj) if isinstance(obj, dict) else set()
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    raise UserError(f"{path}: empty file")
