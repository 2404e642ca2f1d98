"""KV transfer throughput: Arrow KV blocks between two Ray nodes, beside plain numpy, memcpy, pickle.

    RAY_AUTH_MODE=disabled python bench/kv_transfer.py            # sizes 1..256 MiB, 7 reps
    RAY_AUTH_MODE=disabled python bench/kv_transfer.py --reps 5 --sizes-mib 1 16

Starts its own ``LocalCluster`` (head + node ``bench-prefill`` (A) + node ``bench-decode`` (B),
1.2 GiB object store each), a producer actor pinned on A, a consumer actor pinned on B and a
second consumer pinned on A (``label_selector={"hetero.node": ...}``). Prints progress and the
load average to stderr and ONE JSON list last on stdout, one row per size::

    [{"bytes", "arrow_gbps", "ray_numpy_gbps", "memcpy_gbps", "pickle_gbps",
      "same_node_arrow_gbps", "arrow_over_numpy_time", "same_node_zero_copy", ...}]

(plus diagnostic fields: the median milliseconds of each path, the consumer-side split of the
Arrow path into fetch and checksum-verified decode, and the crc32c throughput there).

What is timed (decided here; the issue's goal is "Arrow <= 1.2x the time of the plain-numpy Ray
transfer from 16 MiB up, checksum included"):

- The KV is *produced as Arrow*: the prefill side builds the checksummed RecordBatch
  (``make_synthetic_kv_batch``: encode + crc32c per block) once, before timing, as a real
  prefill actor would when it writes its KV. Computing the producer-side checksums is therefore
  not part of the transfer; verifying them on the decode side is.
- ``arrow``: producer ``t0`` -> ``ray.put(batch)`` -> a call ``consumer.consume([ref])`` (the ref
  is inside a list, so Ray does not resolve it before the method runs and the consumer's fetch
  is timed inside it, as the decode actor reading "by ref" does) -> consumer ``ray.get`` ->
  ``decode_kv(verify=True)`` (structure checks + crc32c of every block) -> ``t1`` in the
  consumer. Time = ``t1 - t0``: both are ``time.perf_counter()`` (CLOCK_MONOTONIC, one clock
  for all processes of this machine), so the return of the ack is not counted; the call
  dispatch and the ``ray.put`` copy into the store are.
- ``ray_numpy``: the identical path with a plain C-contiguous numpy array holding the same
  payload bytes; the consumer only ``ray.get``s it (no checksum) - the transport's limit.
- ``same_node_arrow``: the Arrow path to the consumer on node A (same object store).
  ``same_node_zero_copy`` is true when, in that consumer, every decoded view does not own its
  data, is read-only, and its data pointer lies inside a mapping of the node's plasma store
  (``/proc/self/maps``: the shared-memory file the raylet created) - i.e. the decode reads the
  object store's memory in place. (``np.shares_memory`` cannot be used across processes.)
- ``memcpy``: ``np.copyto`` of the payload into a preallocated, already-touched array of the
  same size, in the producer process (the machine's limit).
- ``pickle``: ``pickle.loads(pickle.dumps(arr, protocol=5))`` of the numpy array with in-band
  buffers, in the producer process (two copies plus a fresh allocation).

Every ``*_gbps`` is bytes / median seconds / 1e9 (gigaBYTES per second). ``bytes`` is the KV
payload per request (the RecordBatch adds ~8 bytes per 1 MiB block of index and checksum
columns plus a schema). Each number is the median of ``--reps`` runs (>= 5); the runs are
interleaved: every repetition visits every size and, inside it, every method, in an order
rotated by repetition and size, so drift (other users of this 2-core machine, a warming page
cache) hits all methods alike. One unrecorded warm-up round precedes the measured ones. Every
ObjectRef is dropped as soon as its consumer has acked; the object store's usage is printed
at the end, and the cluster (only the one started here) is shut down.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import sys
import time
from typing import Any

import numpy as np
import ray

from hetero_sched.runtime.cluster import NODE_LABEL, LocalCluster, make_node
from hetero_sched.runtime.kvcodec import decode_kv, make_synthetic_kv_batch

MIB = 1 << 20
DEFAULT_SIZES_MIB = (1, 4, 16, 64, 256)
OBJECT_STORE_BYTES = int(1.2 * (1 << 30))  # one 256 MiB object plus its copy and headroom
NODE_A = make_node("bench", "prefill", {})
NODE_B = make_node("bench", "decode", {})
METHODS = ("arrow", "ray_numpy", "same_node_arrow", "memcpy", "pickle")
GOAL_FROM_BYTES = 16 * MIB
GOAL_RATIO = 1.2


def log(msg: str) -> None:
    print(f"[kv_transfer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def _plasma_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file mappings that belong to a Ray object store."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if "plasma" in path:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, path))
    return out


@ray.remote(num_cpus=0)
class Consumer:
    """The decode side: fetches the object by ref, decodes (Arrow) and acks with timestamps."""

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_labels().get(NODE_LABEL))

    def consume(self, refs: list[Any], kind: str, check_zero_copy: bool = False) -> dict[str, Any]:
        t_start = time.perf_counter()
        obj = ray.get(refs[0])
        t_got = time.perf_counter()
        if kind == "arrow":
            decoded = decode_kv(obj, verify=True)   # structure + crc32c of every block
            nbytes = decoded.blocks.nbytes
        else:
            nbytes = obj.nbytes                     # plain numpy: nothing to verify
        t_done = time.perf_counter()
        ack: dict[str, Any] = {"t_start": t_start, "t_got": t_got, "t_done": t_done, "nbytes": int(nbytes)}
        if check_zero_copy and kind == "arrow":
            ack.update(self._zero_copy(decoded.blocks))
        # Drop every reference to the object before acking, so the owner's release frees it.
        del obj
        if kind == "arrow":
            del decoded
        del refs[:]
        return ack

    @staticmethod
    def _zero_copy(blocks: np.ndarray) -> dict[str, Any]:
        address = blocks.__array_interface__["data"][0]
        end = address + blocks.nbytes
        maps = _plasma_mappings()
        inside = [p for s, e, p in maps if s <= address and end <= e]
        chain: list[str] = []
        base: Any = blocks
        while base is not None and len(chain) < 8:
            chain.append(type(base).__module__ + "." + type(base).__qualname__)
            base = getattr(base, "base", None) if isinstance(base, np.ndarray) else None
        return {"zero_copy": bool(not blocks.flags.owndata and not blocks.flags.writeable and inside),
                "owndata": bool(blocks.flags.owndata), "writeable": bool(blocks.flags.writeable),
                "mapping": inside[0] if inside else None, "plasma_mappings": len(maps),
                "base_chain": chain}


@ray.remote(num_cpus=0)
class Producer:
    """The prefill side: holds ready-made KV (Arrow and plain numpy) and sends it on request."""

    def __init__(self) -> None:
        self.batches: dict[int, Any] = {}
        self.arrays: dict[int, np.ndarray] = {}
        self.scratch: dict[int, np.ndarray] = {}

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_labels().get(NODE_LABEL))

    def prepare(self, num_bytes: int, seed: int) -> dict[str, Any]:
        """Build the Arrow KV (checksummed) and a numpy array of the same payload bytes."""
        batch = make_synthetic_kv_batch(num_bytes, seed=seed, request_id=seed)
        payload = decode_kv(batch, verify=True).blocks
        array = np.ascontiguousarray(payload).copy()  # owns its memory, same bytes
        assert array.nbytes == num_bytes, (array.nbytes, num_bytes)
        scratch = np.empty_like(array)
        scratch.fill(0)                               # first touch outside the timing
        self.batches[num_bytes], self.arrays[num_bytes], self.scratch[num_bytes] = batch, array, scratch
        return {"blocks": batch.num_rows, "batch_bytes": int(batch.nbytes), "payload_bytes": int(array.nbytes)}

    def send(self, num_bytes: int, kind: str, consumer: Any, check_zero_copy: bool = False) -> dict[str, Any]:
        obj = self.batches[num_bytes] if kind == "arrow" else self.arrays[num_bytes]
        t0 = time.perf_counter()
        ref = ray.put(obj)
        t_put = time.perf_counter()
        ack = ray.get(consumer.consume.remote([ref], kind, check_zero_copy))
        del ref                                       # the object is freed once the owner drops it
        ack.update(t0=t0, t_put=t_put, seconds=ack["t_done"] - t0)
        return ack

    def memcpy(self, num_bytes: int) -> float:
        src, dst = self.arrays[num_bytes], self.scratch[num_bytes]
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    def pickle(self, num_bytes: int) -> float:
        src = self.arrays[num_bytes]
        t0 = time.perf_counter()
        back = pickle.loads(pickle.dumps(src, protocol=5))   # in-band: buffers inside the bytes
        seconds = time.perf_counter() - t0
        assert back.nbytes == src.nbytes
        del back
        return seconds

    def drop(self) -> None:
        self.batches.clear()
        self.arrays.clear()
        self.scratch.clear()
        gc.collect()


def plasma_usage() -> str:
    """The object store's usage line from Ray's memory summary (best effort)."""
    try:
        from ray._private.internal_api import memory_summary
        text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(memory summary unavailable: {type(exc).__name__})"
    lines = [ln.strip() for ln in text.splitlines() if "Plasma memory usage" in ln or "Objects consumed" in ln]
    return "; ".join(lines) or text.strip().splitlines()[-1]


def run_one(method: str, size: int, producer: Any, far: Any, near: Any, zero_copy_probe: bool) -> dict[str, Any]:
    if method == "arrow":
        return ray.get(producer.send.remote(size, "arrow", far))
    if method == "ray_numpy":
        return ray.get(producer.send.remote(size, "numpy", far))
    if method == "same_node_arrow":
        return ray.get(producer.send.remote(size, "arrow", near, zero_copy_probe))
    if method == "memcpy":
        return {"seconds": ray.get(producer.memcpy.remote(size))}
    if method == "pickle":
        return {"seconds": ray.get(producer.pickle.remote(size))}
    raise ValueError(method)


def measure(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    Prod: Any = Producer                         # Ray-decorated classes (typed Any for mypy)
    Cons: Any = Consumer
    on_a = {"label_selector": {NODE_LABEL: NODE_A.name}}
    on_b = {"label_selector": {NODE_LABEL: NODE_B.name}}
    producer = Prod.options(**on_a).remote()
    far = Cons.options(**on_b).remote()
    near = Cons.options(**on_a).remote()
    where = ray.get([producer.node.remote(), far.node.remote(), near.node.remote()])
    log(f"producer on {where[0]}, consumer on {where[1]}, same-node consumer on {where[2]}")
    assert where == [NODE_A.name, NODE_B.name, NODE_A.name], where

    for i, size in enumerate(sizes):
        info = ray.get(producer.prepare.remote(size, seed=i))
        log(f"prepared {size // MIB} MiB: {info}")

    samples: dict[tuple[int, str], list[dict[str, Any]]] = {(s, m): [] for s in sizes for m in METHODS}
    zero_copy: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
    for rep in range(-1, reps):                  # rep -1: warm-up (connections, workers, page cache)
        t_rep = time.perf_counter()
        for si, size in enumerate(sizes):
            k = (rep + si) % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                result = run_one(method, size, producer, far, near, zero_copy_probe=True)
                if method == "same_node_arrow":
                    zero_copy[size].append({key: result[key] for key in
                                            ("zero_copy", "owndata", "writeable", "mapping", "base_chain")})
                if rep >= 0:
                    samples[(size, method)].append(result)
        log(f"{'warm-up' if rep < 0 else f'rep {rep + 1}/{reps}'} done in "
            f"{time.perf_counter() - t_rep:.1f} s; {loadavg()}")

    first = zero_copy[sizes[0]][0]
    log(f"same-node decode view: owndata={first['owndata']} writeable={first['writeable']} "
        f"mapping={first['mapping']} base chain={' -> '.join(first['base_chain'])}")

    rows = []
    for size in sizes:
        med = {m: statistics.median(r["seconds"] for r in samples[(size, m)]) for m in METHODS}
        arrow = samples[(size, "arrow")]
        fetch = statistics.median(r["t_got"] - r["t_start"] for r in arrow)
        verify = statistics.median(r["t_done"] - r["t_got"] for r in arrow)
        put = statistics.median(r["t_put"] - r["t0"] for r in arrow)
        numpy_put = statistics.median(r["t_put"] - r["t0"] for r in samples[(size, "ray_numpy")])
        numpy_fetch = statistics.median(r["t_got"] - r["t_start"] for r in samples[(size, "ray_numpy")])
        row = {
            "bytes": size,
            "arrow_gbps": round(size / med["arrow"] / 1e9, 3),
            "ray_numpy_gbps": round(size / med["ray_numpy"] / 1e9, 3),
            "memcpy_gbps": round(size / med["memcpy"] / 1e9, 3),
            "pickle_gbps": round(size / med["pickle"] / 1e9, 3),
            "same_node_arrow_gbps": round(size / med["same_node_arrow"] / 1e9, 3),
            "arrow_over_numpy_time": round(med["arrow"] / med["ray_numpy"], 3),
            "same_node_zero_copy": all(z["zero_copy"] for z in zero_copy[size]),
            # diagnostics (medians, milliseconds)
            "runs": reps,
            "arrow_ms": round(med["arrow"] * 1e3, 2),
            "ray_numpy_ms": round(med["ray_numpy"] * 1e3, 2),
            "same_node_arrow_ms": round(med["same_node_arrow"] * 1e3, 2),
            "arrow_put_ms": round(put * 1e3, 2),
            "arrow_fetch_ms": round(fetch * 1e3, 2),
            "arrow_verify_decode_ms": round(verify * 1e3, 2),
            "numpy_put_ms": round(numpy_put * 1e3, 2),
            "numpy_fetch_ms": round(numpy_fetch * 1e3, 2),
            "arrow_verify_decode_gbps": round(size / verify / 1e9, 3),
        }
        rows.append(row)
        log(f"{size // MIB:>4} MiB: arrow {row['arrow_gbps']:.3f} GB/s ({row['arrow_ms']} ms), "
            f"numpy {row['ray_numpy_gbps']:.3f} GB/s ({row['ray_numpy_ms']} ms), ratio "
            f"{row['arrow_over_numpy_time']}, same-node {row['same_node_arrow_gbps']:.3f} GB/s, "
            f"memcpy {row['memcpy_gbps']:.2f}, pickle {row['pickle_gbps']:.2f}; arrow split put "
            f"{row['arrow_put_ms']} / fetch {row['arrow_fetch_ms']} / verify {row['arrow_verify_decode_ms']} ms")

    ray.get(producer.drop.remote())
    for actor in (producer, far, near):
        ray.kill(actor)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="measured runs per size and method (>= 5)")
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=list(DEFAULT_SIZES_MIB))
    args = ap.parse_args()
    if args.reps < 5:
        ap.error("--reps must be >= 5 (each number is a median of >= 5 runs)")
    sizes = [s * MIB for s in args.sizes_mib]
    if max(sizes) * 3 > OBJECT_STORE_BYTES:
        ap.error(f"sizes above {OBJECT_STORE_BYTES // 3 // MIB} MiB do not fit the object store comfortably")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # our own private cluster (see RAY_NOTES)
    t_start = time.perf_counter()
    log(f"start: {loadavg()} on {os.cpu_count()} CPUs; sizes {args.sizes_mib} MiB, {args.reps} reps")
    cluster = LocalCluster([NODE_A, NODE_B], object_store_bytes=OBJECT_STORE_BYTES)
    try:
        cluster.start()
        log(f"cluster up at {cluster.address} in {cluster.bring_up_s:.1f} s "
            f"(object store {OBJECT_STORE_BYTES / (1 << 30):.1f} GiB per node)")
        ray.init(address=cluster.address, namespace="hetero-sched-bench", log_to_driver=False)
        rows = measure(sizes, args.reps)
        time.sleep(1.0)                                  # frees are asynchronous
        log(f"object store after the run: {plasma_usage()}")
    finally:
        cluster.shutdown()                               # only the cluster started here
    for row in rows:
        if row["bytes"] >= GOAL_FROM_BYTES:
            verdict = "met" if row["arrow_over_numpy_time"] <= GOAL_RATIO else "MISSED"
            log(f"goal Arrow <= {GOAL_RATIO}x numpy time at {row['bytes'] // MIB} MiB: {verdict} "
                f"({row['arrow_over_numpy_time']}x)")
    log(f"same-node zero-copy decode: {all(r['same_node_zero_copy'] for r in rows)}")
    log(f"end: {loadavg()}; total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
