"""Cluster bring-up: node layout, capacity checks, label placement, connect errors.

Tests marked ``ray`` share the session cluster (``ray_cluster`` in conftest): a head plus
nodes trn2/prefill (neuron_cores 256), cs3/decode (cs3 8) and h100/both (GPU 8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import ray

from hetero_sched.errors import UserError
from hetero_sched.experiment import Experiment, load_experiment, parse_experiment
from hetero_sched.runtime.cluster import (ACTOR_RESTARTS, HEAD_LABELS, LocalCluster, NodeSpec, check_capacity, connect,
                                          ensure_cluster, nodes_for, placement_options)

TRN2 = {"name": "trn2-prefill", "device": "trn2", "count": 16, "tp": 64, "replicas": 4, "role": "prefill"}
CS3 = {"name": "cs3-decode", "device": "cs3", "count": 4, "pp": 4, "role": "decode"}
H100 = {"name": "h100-colo", "device": "h100", "count": 2, "tp": 2, "role": "both"}


def experiment(*groups: dict[str, Any]) -> Experiment:
    base, _ = load_experiment(None)
    return parse_experiment({**base.model_dump(), "groups": list(groups)}, "test")


@ray.remote(num_cpus=0)
class _Where:
    """An actor that reports the labels of the node it landed on."""

    def labels(self) -> dict[str, Any]:
        return dict(ray.get_runtime_context().get_node_labels())  # Ray annotates list values; they are str


# Decorated, so the module name refers to the actor class and Ray pickles the class by value:
# workers cannot import `test_cluster` (tests/ is not on their path).
Where: Any = _Where


# --- layout (no Ray) --------------------------------------------------------------------------

def test_nodes_for_default_experiment() -> None:
    exp, _ = load_experiment(None)
    assert nodes_for(exp) == [
        NodeSpec("trn2-prefill", {"neuron_cores": 256.0},
                 {"hetero.device": "trn2", "hetero.pool": "prefill", "hetero.node": "trn2-prefill"}, 1),
        NodeSpec("cs3-decode", {"cs3": 4.0},
                 {"hetero.device": "cs3", "hetero.pool": "decode", "hetero.node": "cs3-decode"}, 1),
    ]


def test_nodes_for_sums_groups_of_one_device_and_pool() -> None:
    small = {"name": "trn2-small", "device": "trn2", "count": 8, "tp": 32, "role": "prefill"}
    flex = {**CS3, "name": "cs3-flex", "pool": "flex", "replicas": 2}
    nodes = {n.name: n for n in nodes_for(experiment(TRN2, small, flex, H100))}
    assert nodes["trn2-prefill"].resources == {"neuron_cores": 4 * 64.0 + 32.0}
    assert nodes["cs3-flex"].resources == {"cs3": 8.0}
    assert nodes["cs3-flex"].labels["hetero.pool"] == "flex"
    assert nodes["h100-both"].resources == {"GPU": 2.0}
    assert list(nodes) == ["trn2-prefill", "cs3-flex", "h100-both"]


def test_placement_options() -> None:
    trn2, h100 = experiment(TRN2, H100).groups
    restarts = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": 0}    # a crashed actor comes back
    assert placement_options(trn2) == {"num_cpus": 0, "resources": {"neuron_cores": 64.0}, **restarts,
                                       "label_selector": {"hetero.device": "trn2", "hetero.pool": "prefill"}}
    assert placement_options(h100) == {"num_cpus": 0, "num_gpus": 2.0, "resources": {}, **restarts,
                                       "label_selector": {"hetero.device": "h100", "hetero.pool": "both"}}


def _node(name: str, resources: dict[str, float], device: str, pool: str) -> dict[str, Any]:
    return {"Alive": True, "Resources": resources,
            "Labels": {"hetero.device": device, "hetero.pool": pool, "hetero.node": name}}


def test_check_capacity_packs_each_replica_onto_one_node() -> None:
    two_small = [_node("a", {"neuron_cores": 64.0}, "trn2", "prefill"),
                 _node("b", {"neuron_cores": 64.0}, "trn2", "prefill")]
    two = experiment({**TRN2, "replicas": 2})
    check_capacity(two, two_small)
    big = experiment({**TRN2, "count": 32, "tp": 64, "pp": 2, "replicas": 1})
    with pytest.raises(UserError) as err:  # 128 cores in total, but never 128 on one node
        check_capacity(big, two_small)
    assert str(err.value) == ("group trn2-prefill (1 x {neuron_cores: 128}) needs nodes labelled "
                              "hetero.device=trn2, hetero.pool=prefill; the cluster has 2 such nodes "
                              "with neuron_cores=64; neuron_cores=64")


def test_check_capacity_ignores_dead_nodes() -> None:
    dead = {**_node("a", {"neuron_cores": 256.0}, "trn2", "prefill"), "Alive": False}
    with pytest.raises(UserError, match="the cluster has no such node"):
        check_capacity(experiment(TRN2), [dead])


def test_local_cluster_not_started() -> None:
    cluster = LocalCluster([])
    cluster.shutdown()  # idempotent, also before start
    assert not cluster.is_running
    with pytest.raises(RuntimeError):
        _ = cluster.address
    with pytest.raises(UserError, match="repeated: head"):
        LocalCluster([NodeSpec("head")])


# --- connect (no cluster needed) ---------------------------------------------------------------

def test_connect_bad_address_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^no Ray cluster reachable at 127.0.0.1:1 \(--address\)"):
        connect("127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match=r"\(RAY_ADDRESS\)"):
        connect(None)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UserError, match="pass --address or set RAY_ADDRESS"):
        connect(None)
    assert time.monotonic() - t0 < 10


# --- the session cluster -----------------------------------------------------------------------

@pytest.mark.ray
def test_session_cluster_nodes(ray_cluster: LocalCluster) -> None:
    labels = {n["Labels"]["hetero.node"]: n for n in ray.nodes() if n["Alive"]}
    assert set(labels) == {"head", "trn2-prefill", "cs3-decode", "h100-both"}
    assert labels["trn2-prefill"]["Resources"]["neuron_cores"] == 256
    assert labels["trn2-prefill"]["Labels"]["ray.io/accelerator-type"] == "aws-neuron-core"
    assert labels["cs3-decode"]["Resources"]["cs3"] == 8
    assert labels["h100-both"]["Resources"]["GPU"] == 8
    assert ray_cluster.bring_up_s is not None and ray_cluster.bring_up_s < 60


@pytest.mark.ray
def test_check_capacity_passes(ray_cluster: LocalCluster) -> None:
    exp, _ = load_experiment(None)
    check_capacity(exp)
    check_capacity(experiment(TRN2, {**CS3, "replicas": 2}, {**H100, "replicas": 4}))


@pytest.mark.ray
def test_check_capacity_too_many_replicas(ray_cluster: LocalCluster) -> None:
    with pytest.raises(UserError) as err:
        check_capacity(experiment({**TRN2, "replicas": 5}, CS3))
    assert str(err.value) == ("group trn2-prefill (5 x {neuron_cores: 64}) needs nodes labelled "
                              "hetero.device=trn2, hetero.pool=prefill; the cluster has 1 such node "
                              "with neuron_cores=256")


@pytest.mark.ray
def test_check_capacity_unlabelled_device_or_pool(ray_cluster: LocalCluster) -> None:
    trn3 = {"name": "trn3-prefill", "device": "trn3", "count": 16, "tp": 64, "role": "prefill"}
    with pytest.raises(UserError) as err:
        check_capacity(experiment(trn3, CS3))
    assert str(err.value) == ("group trn3-prefill (1 x {neuron_cores: 64}) needs nodes labelled "
                              "hetero.device=trn3, hetero.pool=prefill; the cluster has no such node "
                              "(device/pool labels present: cs3/decode, h100/both, trn2/prefill)")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="hetero.pool=decode; the cluster has no such node"):
        check_capacity(experiment(TRN2, {**H100, "role": "decode"}))


@pytest.mark.ray
def test_actors_land_only_where_labels_allow(ray_cluster: LocalCluster) -> None:
    trn2, cs3 = experiment(TRN2, CS3).groups
    actors = [Where.options(**placement_options(trn2)).remote() for _ in range(trn2.replicas)]
    # Labels alone pin an actor that asks for no resources at all (any node could host it).
    actors.append(Where.options(num_cpus=0, label_selector={"hetero.pool": "decode"}).remote())
    actors.append(Where.options(**placement_options(cs3)).remote())
    actors.append(Where.options(num_cpus=0, label_selector=dict(HEAD_LABELS)).remote())
    try:
        where = [labels["hetero.node"] for labels in ray.get([a.labels.remote() for a in actors], timeout=30)]
        assert where == ["trn2-prefill"] * 4 + ["cs3-decode", "cs3-decode", "head"]
    finally:
        for a in actors:
            ray.kill(a)


@pytest.mark.ray
def test_actor_with_unmatched_labels_stays_pending(ray_cluster: LocalCluster) -> None:
    # The h100 node has GPUs, but no node labelled trn2 does: the label selector must win.
    actor = Where.options(num_cpus=0, num_gpus=1, label_selector={"hetero.device": "trn2"}).remote()
    try:
        ready, _ = ray.wait([actor.labels.remote()], timeout=2)
        assert ready == []
    finally:
        ray.kill(actor)


@pytest.mark.ray
def test_ensure_cluster_on_existing_cluster_keeps_driver(ray_cluster: LocalCluster) -> None:
    exp, _ = load_experiment(None)
    with ensure_cluster(exp, ray_cluster.address) as address:
        assert address == ray_cluster.address
    assert ray.is_initialized()
    with pytest.raises(UserError, match="neuron_cores: 64"):
        with ensure_cluster(experiment({**TRN2, "replicas": 9}), ray_cluster.address):
            pass
    assert ray.is_initialized()


LOCAL_RUN = textwrap.dedent("""
    import json, time
    import ray
    from hetero_sched.experiment import load_experiment
    from hetero_sched.runtime.cluster import ensure_cluster

    exp, _ = load_experiment(None)
    t0 = time.monotonic()
    with ensure_cluster(exp) as address:
        up_s = time.monotonic() - t0
        nodes = sorted(n["Labels"]["hetero.node"] for n in ray.nodes() if n["Alive"])
    print(json.dumps({"address": address, "nodes": nodes, "up_s": up_s,
                      "connected": ray.is_initialized()}))
""")


def test_ensure_cluster_starts_and_stops_a_local_cluster() -> None:
    """The no-address path (`hetero-sched run`), in its own process: up, checked, gone."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([sys.executable, "-c", LOCAL_RUN], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == ["cs3-decode", "head", "trn2-prefill"]
    assert not out["connected"]
    port = out["address"].rsplit(":", 1)[1]
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any(port in arg for arg in (p.info["cmdline"] or []))
                 and any("ray" in arg for arg in p.info["cmdline"])]
    assert leftovers == []
    with pytest.raises(UserError, match="no Ray cluster reachable"):
        connect(out["address"])
