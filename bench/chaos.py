"""Chaos: a long compressed run with faults injected periodically. Is any request lost?

    RAY_AUTH_MODE=disabled python bench/chaos.py [--requests 1500] [--rate 15] [--time-scale 1.0]
        [--kill-every-s 10] [--scheduler-kill-every 4] [--corrupt-every 25] [--seed 0]

A local labelled cluster runs a disaggregated Llama-3.1-8B experiment (two Trainium prefill
groups, two CS-3 decode groups; modeled backend, real KV bytes, wall clock compressed by
``--time-scale``) on synthetic Azure-conversation-like requests. While it runs, a seeded chaos
thread SIGKILLs a random device-group actor's process every ``--kill-every-s`` wall seconds
(Ray restarts it; the scheduler resumes what it held) — every ``--scheduler-kill-every``-th
kill hits the scheduler actor instead (Ray restarts it; it recovers from its journal) — and every ``--corrupt-every``-th KV
export has one payload bit flipped (caught by checksum, sent again). The resident memory of the
run's actors is sampled every second.

- ``lost`` = submitted − completed − rejected − failed (must be 0); ``duplicates``: request ids
  recorded more than once (must be 0); ``failed`` is always 0 here (every end is a completion or
  a rejection with its reason);
- ``faults_injected``: group-actor kills seen by the scheduler + scheduler restarts + KV exports
  corrupted;
- ``recovery_p99_s``: p99 end-to-end latency (modeled seconds) of the requests in flight at a
  kill (of a group actor or of the scheduler), against ``p99_s`` of all requests;
- ``group_down_s_mean``: modeled seconds a killed group was out of service (its actor's restart);
- ``rss_mb_start`` / ``rss_mb_end``: summed RSS of this cluster's scheduler and group actors
  while the first 10–20% of requests finish (after warm-up) and over the last 10% of samples
  (flat = no leak); ``rss_mb_by_actor``: the same two figures per actor class.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import psutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from hetero_sched.runtime.cluster import LocalCluster, connect, nodes_for  # noqa: E402
from hetero_sched.runtime.live import run_live  # noqa: E402
from hetero_sched.engine.assembly import resolve  # noqa: E402

ACTOR_TITLES = ("ray::DeviceGroupActor", "ray::SchedulerActor")


def _actor_processes(address: str, prefix: str = "ray::") -> list[psutil.Process]:
    """This cluster's actor processes whose title starts with ``prefix`` (a worker's parent is its
    node's raylet, started with the cluster's GCS address): another Ray cluster on the machine —
    a test suite's — is neither killed nor counted."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"]
        if not (cmd and cmd[0].startswith(prefix)):
            continue
        try:
            parent = p.parent()
            if parent is not None and f"--gcs-address={address}" in parent.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def _rss_mb(address: str) -> dict[str, float]:
    """Resident MB of this cluster's scheduler and group actors, by actor class."""
    total = {title: 0.0 for title in ACTOR_TITLES}
    for p in _actor_processes(address):
        title = next((t for t in ACTOR_TITLES if p.info["cmdline"][0].startswith(t)), None)
        if title is not None:
            try:
                total[title] += p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rate", type=float, default=15.0, help="arrivals per modeled second")
    ap.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per modeled second")
    ap.add_argument("--kill-every-s", type=float, default=10.0, help="wall seconds between actor kills")
    ap.add_argument("--scheduler-kill-every", type=int, default=4,
                    help="every k-th kill hits the scheduler actor (0: never)")
    ap.add_argument("--corrupt-every", type=int, default=25, help="flip a bit in every k-th KV export (0: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the run folder here (requests, decisions, summary)")
    args = ap.parse_args()

    exp, _ = resolve({
        "name": "chaos", "seed": args.seed, "model": "llama-3.1-8b",
        "groups": [{"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 2, "role": "prefill"},
                   {"name": "d", "device": "cs3", "count": 1, "replicas": 2, "role": "decode", "max_num_seqs": 32}],
        "policy": "disagg",
        "workload": {"kind": "synthetic", "num_requests": args.requests, "rate_per_s": args.rate},
        "slo": "standard",
    })
    rng = np.random.default_rng(args.seed)
    stop = threading.Event()
    kills: list[float] = []
    rss: list[tuple[int, dict[str, float]]] = []        # (requests done, MB by actor class)
    address = [""]
    done_now = [0]

    def chaos() -> None:
        next_kill = time.monotonic() + args.kill_every_s
        while not stop.wait(1.0):
            rss.append((done_now[0], _rss_mb(address[0])))
            if time.monotonic() >= next_kill:
                k = args.scheduler_kill_every
                at_scheduler = k > 0 and (len(kills) + 1) % k == 0
                victims = _actor_processes(address[0], "ray::SchedulerActor" if at_scheduler else "ray::DeviceGroupActor")
                if victims:
                    victim = victims[int(rng.integers(len(victims)))]
                    try:
                        os.kill(victim.pid, signal.SIGKILL)
                        kills.append(time.monotonic())
                    except ProcessLookupError:
                        pass
                next_kill = time.monotonic() + args.kill_every_s

    with LocalCluster(nodes_for(exp)) as cluster:
        connect(cluster.address)
        address[0] = cluster.address
        progress_at = [0]

        def progress(done: int, total: int) -> None:
            done_now[0] = done
            if done - progress_at[0] >= total // 10:
                progress_at[0] = done
                print(f"chaos: {done}/{total} requests, {len(kills)} kills", file=sys.stderr)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        t0 = time.monotonic()
        r = run_live(exp, address=cluster.address, clock="wall", time_scale=args.time_scale,
                     faults={"corrupt_every": args.corrupt_every, "seed": args.seed} if args.corrupt_every else None,
                     progress=progress)
        wall_s = time.monotonic() - t0
        stop.set()
        thread.join()

    if args.out:
        r.write(args.out)
    rows = r.records.to_pylist()
    ids = [row["request_id"] for row in rows]
    status = [row["status"] for row in rows]
    completed, rejected = status.count("completed"), status.count("rejected")
    failures = r.summary["runtime"]["failures"]
    restarts = r.summary["runtime"]["scheduler_restarts_at_s"]
    fault_times = [f["time_s"] for f in failures] + restarts
    e2e = np.array([row["finish_s"] - row["arrival_s"] for row in rows if row["status"] == "completed"])
    hit = np.array([row["finish_s"] - row["arrival_s"] for row in rows if row["status"] == "completed"
                    and any(row["arrival_s"] <= t <= row["finish_s"] for t in fault_times)])
    # how long each killed group was out of service (modeled seconds): a FAIL to its RESTORE
    down, failed_at = [], {}
    for t, kind, gid, _, _ in r.decisions:
        if kind == "fail":
            failed_at[gid] = t
        elif kind == "restore" and gid in failed_at:
            down.append(t - failed_at.pop(gid))
    warm = [mb for done, mb in rss if args.requests // 10 <= done <= args.requests // 5]
    tail = [mb for _, mb in rss[-max(1, len(rss) // 10):]]

    def mean_mb(samples: list[dict[str, float]], title: Optional[str] = None) -> Optional[float]:
        values = [sum(mb.values()) if title is None else mb[title] for mb in samples]
        return round(float(np.mean(values)), 1) if values else None

    out = {
        "submitted": args.requests,
        "completed": completed,
        "rejected": rejected,
        "failed": 0,
        "lost": args.requests - completed - rejected,
        "duplicates": len(ids) - len(set(ids)),
        "faults_injected": len(failures) + len(restarts) + r.summary["runtime"]["kv_damaged"],
        "actor_kills": len(failures),
        "scheduler_restarts": len(restarts),
        "actor_kills_sent": len(kills),
        "kv_corruptions_caught": r.summary["runtime"]["kv_damaged"],
        "restarted": sum(1 for f in failures if f["restarted"]),
        "recovery_p99_s": float(np.percentile(hit, 99)) if hit.size else None,
        "p99_s": float(np.percentile(e2e, 99)) if e2e.size else None,
        "rss_mb_start": mean_mb(warm),
        "rss_mb_end": mean_mb(tail),
        "rss_mb_by_actor": {t.removeprefix("ray::"): [mean_mb(warm, t), mean_mb(tail, t)] for t in ACTOR_TITLES},
        "group_down_s_mean": float(np.mean(down)) if down else None,
        "lateness_ms_p99": r.summary["runtime"]["lateness_ms_p99"],
        "stuck_actors": r.summary["runtime"]["stuck_actors"],
        "wall_s": wall_s,
        "command": "python bench/chaos.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
