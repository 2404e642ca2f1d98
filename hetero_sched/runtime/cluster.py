"""Cluster bring-up: connect to a Ray cluster, or start a local one of labelled nodes, and
check that it can host an experiment's device groups.

Placement (DESIGN "Device groups and placement on Ray", contract §6 and §9): each device group
is one actor asking for its ``GroupSpec.ray_resources()`` with ``num_cpus=0`` and the label
selector ``{hetero.device: <device>, hetero.pool: <pool>}``. The pool names which groups *may*
take which role; the role itself is runtime state. A node carries the labels of the one
(device, pool) it serves plus ``hetero.node: <name>``; the head carries ``hetero.node: head``
and the CPU the scheduler actor and drivers use.

The local cluster is built with ``ray.cluster_utils.Cluster`` rather than ``ray start``
subprocesses: every port (GCS, raylets, agents, dashboard) is picked free by the OS, so it never
collides with other Ray clusters on the same machine; its processes fate-share with the
driver, so a crashed ``hetero-sched run`` leaves nothing behind; and shutdown kills exactly the
processes it started (``ray stop`` would kill every cluster on the machine). A cluster that must
outlive its driver (``clusters/laptop.sh``) uses ``ray start`` instead.

Authentication: Ray >= 2.59 turns token auth on for local clusters. A ``LocalCluster`` respects
``RAY_AUTH_MODE`` when it is set; otherwise it sets it to ``disabled`` for this process and the
nodes it starts (a private cluster on this machine, ports chosen at random). ``connect`` leaves
the mode to the environment (Ray reads ``RAY_AUTH_TOKEN``/``~/.ray/auth_token``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
# private: their one use is object_store_usage
from ray._private.internal_api import get_memory_info_reply, get_state_from_address, store_stats_summary
from ray.cluster_utils import Cluster

# Ray private APIs (Ray is pinned to 2.60): the calls ray.init() itself makes to set up token
# auth and to resolve "auto"/localhost addresses, and the path of Ray's "last cluster" file.
from ray._common.utils import get_ray_address_file
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import AuthenticationMode, Config, get_authentication_mode  # type: ignore[attr-defined]

from hetero_sched.catalog.groups import DEVICE_LABEL, GroupSpec
from hetero_sched.errors import UserError
from hetero_sched.experiment import Experiment, GroupConfig

log = logging.getLogger(__name__)

POOL_LABEL = "hetero.pool"
"""Node label naming the pool of groups a node may host (``prefill``, ``decode``, ``both``, …)."""
NODE_LABEL = "hetero.node"
"""Node label naming the node itself (``head``, ``trn2-prefill``, …)."""
HEAD_NAME = "head"
HEAD_LABELS: Mapping[str, str] = {NODE_LABEL: HEAD_NAME}
"""Label selector for actors that belong on the head (the scheduler actor)."""
NAMESPACE = "hetero-sched"
AUTH_MODE_ENV = "RAY_AUTH_MODE"

WORKER_NUM_CPUS = 1
HEAD_NUM_CPUS = 2
OBJECT_STORE_BYTES = 256 * 2**20
"""Per node: small, so a head and several workers fit in a 2-core / 24 GB machine."""
NODE_WAIT_S = 60.0
ACTOR_RESTARTS = 10
"""Times Ray restarts a device-group actor that died before its group is retired."""
PROBE_TIMEOUT_S = 3.0
_EPS = 1e-6


@dataclass(frozen=True)
class NodeSpec:
    """One node of a local cluster: its device resources, labels and CPUs."""

    name: str
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    num_cpus: int = WORKER_NUM_CPUS


HEAD_NODE = NodeSpec(HEAD_NAME, {}, dict(HEAD_LABELS), HEAD_NUM_CPUS)
"""The head: no device resources, CPU for the scheduler actor and drivers."""


def group_pool(group: GroupConfig) -> str:
    """The pool a group belongs to (its role when the config leaves ``pool`` empty)."""
    return group.pool or group.role


def group_spec(group: GroupConfig) -> GroupSpec:
    """The catalog :class:`GroupSpec` of one configured group (one replica)."""
    return GroupSpec(group.device, group.count, group.tp, group.pp)


def group_labels(group: GroupConfig) -> dict[str, str]:
    """The label selector a group's actor uses: its device kind and pool."""
    return {**group_spec(group).node_labels(), POOL_LABEL: group_pool(group)}


def placement_options(group: GroupConfig) -> dict[str, Any]:
    """``.options(**...)`` for one replica's actor: its device resources, no CPU, its labels.

    Ray refuses ``GPU`` inside ``resources``; it goes to ``num_gpus``.
    """
    resources = dict(group_spec(group).ray_resources())
    options: dict[str, Any] = {"num_cpus": 0, "label_selector": group_labels(group),
                               # a crashed actor comes back (empty); the scheduler re-places what it held
                               "max_restarts": ACTOR_RESTARTS, "max_task_retries": 0}
    if "GPU" in resources:
        options["num_gpus"] = resources.pop("GPU")
    options["resources"] = resources
    return options


def make_node(device: str, pool: str, resources: Mapping[str, float]) -> NodeSpec:
    """A worker node named ``<device>-<pool>`` carrying ``resources`` and the matching labels."""
    name = f"{device}-{pool}"
    labels = {DEVICE_LABEL: device, POOL_LABEL: pool, NODE_LABEL: name}
    return NodeSpec(name, dict(resources), labels, WORKER_NUM_CPUS)


def nodes_for(exp: Experiment) -> list[NodeSpec]:
    """Worker nodes that host ``exp``: one per (device, pool), sized for all its replicas.

    The head (:data:`HEAD_NODE`) is not included; :class:`LocalCluster` adds it.
    """
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for g in exp.groups:
        need = totals.setdefault((g.device, group_pool(g)), {})
        for name, amount in group_spec(g).ray_resources().items():
            need[name] = need.get(name, 0.0) + amount * g.replicas
    return [make_node(device, pool, res) for (device, pool), res in totals.items()]


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()))


class LocalCluster:
    """A head plus labelled worker nodes on this machine (a context manager).

    Nothing starts in the constructor; :meth:`start` (or ``with``) brings every node up and
    returns once all are alive; :meth:`shutdown` stops only these processes and is idempotent.
    """

    def __init__(self, nodes: Sequence[NodeSpec], *, head: NodeSpec = HEAD_NODE,
                 object_store_bytes: int = OBJECT_STORE_BYTES, include_dashboard: bool = False,
                 auth_mode: Optional[str] = None) -> None:
        names = [head.name, *(n.name for n in nodes)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"local cluster: node names must be unique; repeated: {', '.join(dup)}")
        self.head = head
        self.nodes = tuple(nodes)
        self.object_store_bytes = object_store_bytes
        self.include_dashboard = include_dashboard
        self.auth_mode = auth_mode
        self.bring_up_s: Optional[float] = None
        self._cluster: Optional[Cluster] = None

    @property
    def address(self) -> str:
        """The GCS address (``host:port``) to pass to ``ray.init`` / ``--address``."""
        if self._cluster is None:
            raise RuntimeError("local cluster is not running")
        return str(self._cluster.address)

    @property
    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown`."""
        return self._cluster is not None

    def start(self) -> "LocalCluster":
        """Start the head and every worker node; return when all are alive."""
        if self._cluster is not None:
            return self
        t0 = time.monotonic()
        _set_local_auth_mode(self.auth_mode)
        cluster = Cluster(shutdown_at_exit=True)
        self._cluster = cluster
        try:
            with _keep_ray_address_file():
                cluster.add_node(wait=False, **self._node_args(self.head, head=True))
            for node in self.nodes:
                cluster.add_node(wait=False, **self._node_args(node, head=False))
            cluster.wait_for_nodes(timeout=NODE_WAIT_S)
        except BaseException:
            self.shutdown()
            raise
        self.bring_up_s = time.monotonic() - t0
        log.info("local Ray cluster of %d nodes up at %s in %.1f s",
                 1 + len(self.nodes), self.address, self.bring_up_s)
        return self

    def _node_args(self, node: NodeSpec, *, head: bool) -> dict[str, Any]:
        resources = dict(node.resources)
        args: dict[str, Any] = {
            "num_cpus": node.num_cpus,
            "num_gpus": int(resources.pop("GPU", 0)),
            "resources": resources,
            "labels": dict(node.labels),
            "object_store_memory": self.object_store_bytes,
            "dashboard_agent_listen_port": None,  # a free port, not 52365
        }
        if head:
            args["include_dashboard"] = self.include_dashboard
            args["dashboard_port"] = 0  # a free port, not 8265
            # live metrics reach the Prometheus endpoint within 1 s, not Ray's default 10 s
            args["_system_config"] = {"metrics_report_interval_ms": 1000}
        return args

    def add_node(self, node: NodeSpec) -> Any:
        """Start one more labelled worker node; returns its handle for :meth:`remove_node`."""
        if self._cluster is None:
            raise RuntimeError("local cluster is not running")
        handle = self._cluster.add_node(wait=False, **self._node_args(node, head=False))
        self._cluster.wait_for_nodes(timeout=NODE_WAIT_S)
        return handle

    def remove_node(self, handle: Any) -> None:
        """Kill a worker node's processes at once, as a node failure would (not gracefully)."""
        if self._cluster is None:
            raise RuntimeError("local cluster is not running")
        self._cluster.remove_node(handle, allow_graceful=False)

    def shutdown(self) -> None:
        """Disconnect a driver attached to this cluster and stop its processes (idempotent)."""
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        if cluster.head_node is not None and ray.is_initialized() \
                and ray.get_runtime_context().gcs_address == cluster.address:
            ray.shutdown()
        with _keep_ray_address_file():
            cluster.shutdown()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _set_local_auth_mode(mode: Optional[str]) -> None:
    """Make this process and the nodes it spawns agree on ``RAY_AUTH_MODE``."""
    mode = mode or os.environ.get(AUTH_MODE_ENV) or "disabled"
    os.environ[AUTH_MODE_ENV] = mode
    want = AuthenticationMode.TOKEN if mode.lower() == "token" else AuthenticationMode.DISABLED
    if get_authentication_mode() != want and not ray.is_initialized():
        Config.initialize("")  # Ray caches the mode it first read; ray.init() does the same
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


@contextlib.contextmanager
def _keep_ray_address_file() -> Iterator[None]:
    """Leave ``/tmp/ray/ray_current_cluster`` as it was.

    Starting a head writes our address there and ``Cluster.shutdown`` deletes it; either would
    redirect or break ``--address auto`` for another cluster on this machine. We always pass
    explicit addresses, so we restore the previous content.
    """
    path = get_ray_address_file(None)
    before = open(path).read() if os.path.exists(path) else None
    try:
        yield
    finally:
        if before is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(before)


def _resolve(address: str) -> tuple[str, str, int]:
    """(address to pass to ray.init, host, port) for a user-given address."""
    if address.startswith("ray://"):
        target = address
        hostport = address.removeprefix("ray://")
    else:
        try:
            target = hostport = canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError) as exc:
            raise UserError(f"Ray address {address!r}: {str(exc).splitlines()[0]}") from None
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected host:port")
    return target, host.strip("[]"), int(port)


def connect(address: Optional[str], *, namespace: str = NAMESPACE) -> None:
    """Connect this driver to the Ray cluster at ``address`` (else ``RAY_ADDRESS``).

    ``auto`` means the cluster last started on this machine. A ``UserError`` (one line, within
    a few seconds) when nothing answers there; Ray itself would retry for minutes.
    """
    given = address or os.environ.get("RAY_ADDRESS")
    if not given:
        raise UserError("no Ray cluster address: pass --address or set RAY_ADDRESS")
    source = "RAY_ADDRESS" if not address else "--address"
    target, host, port = _resolve(given)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"no Ray cluster reachable at {given} ({source}): "
                        f"{exc.strerror or type(exc).__name__}") from None
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if current == target:
            return
        raise UserError(f"this process is already connected to the Ray cluster at {current}, not {given}")
    try:
        ray.init(address=target, namespace=namespace)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        hint = "" if get_authentication_mode() == AuthenticationMode.TOKEN else \
            f" (a cluster with token auth needs {AUTH_MODE_ENV}=token and its token in RAY_AUTH_TOKEN)"
        raise UserError(f"cannot connect to the Ray cluster at {given}: {str(exc).splitlines()[0]}{hint}") from None


def _pack(demands: list[tuple[GroupConfig, dict[str, float]]],
          nodes: list[dict[str, float]]) -> Optional[GroupConfig]:
    """First-fit decreasing of replicas onto nodes; the first group that does not fit."""
    free = [dict(n) for n in nodes]
    for group, need in sorted(demands, key=lambda d: -sum(d[1].values())):
        for _ in range(group.replicas):
            slot = next((f for f in free if all(f.get(k, 0.0) + _EPS >= v for k, v in need.items())), None)
            if slot is None:
                return group
            for k, v in need.items():
                slot[k] -= v
    return None


def check_capacity(exp: Experiment, nodes: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Check the cluster can host every group of ``exp`` (each replica on one node).

    ``nodes`` are ``ray.nodes()`` entries (default: the connected cluster's). Counts alive
    nodes' total resources (the experiment is assumed to own them). ``UserError`` naming the
    first group that cannot be placed and what the cluster has.
    """
    if nodes is None:
        if not ray.is_initialized():
            raise RuntimeError("check_capacity needs a connected driver; call connect() first")
        nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    by_key: dict[tuple[str, str], list[GroupConfig]] = {}
    for g in exp.groups:
        by_key.setdefault((g.device, group_pool(g)), []).append(g)
    for (device, pool), groups in by_key.items():
        wanted = {DEVICE_LABEL: device, POOL_LABEL: pool}
        matching = [n for n in alive if all(n.get("Labels", {}).get(k) == v for k, v in wanted.items())]
        demands = [(g, group_spec(g).ray_resources()) for g in groups]
        failed = _pack(demands, [n["Resources"] for n in matching])
        if failed is None:
            continue
        need = group_spec(failed).ray_resources()
        names = sorted({k for _, d in demands for k in d})
        has = [_fmt({k: n["Resources"].get(k, 0.0) for k in names}) for n in matching]
        if matching:
            what = f"{len(matching)} such node{'s' if len(has) > 1 else ''} with {'; '.join(has)}"
        else:
            kinds = sorted({f"{n['Labels'][DEVICE_LABEL]}/{n['Labels'].get(POOL_LABEL, '?')}"
                            for n in alive if DEVICE_LABEL in n.get("Labels", {})})
            what = "no such node" + (f" (device/pool labels present: {', '.join(kinds)})" if kinds
                                     else f" (no node carries {DEVICE_LABEL})")
        others = [g.name for g in groups if g is not failed]
        shared = f" (shared with group {', '.join(others)})" if others else ""
        raise UserError(f"group {failed.name} ({failed.replicas} x {{{_fmt(need).replace('=', ': ')}}}) "
                        f"needs nodes labelled {DEVICE_LABEL}={device}, {POOL_LABEL}={pool}{shared}; "
                        f"the cluster has {what}")


@contextlib.contextmanager
def ensure_cluster(exp: Experiment, address: Optional[str] = None) -> Iterator[str]:
    """A connected cluster able to host ``exp``; yields its address.

    With ``address`` (or ``RAY_ADDRESS``): connect and check. Otherwise start a
    :class:`LocalCluster` of :func:`nodes_for` ``exp``, connect and check. On exit, stop what
    was started here and disconnect the driver if it was connected here.
    """
    was_connected = ray.is_initialized()
    cluster: Optional[LocalCluster] = None
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            connect(address)
        else:
            if was_connected:
                raise UserError("this process is already connected to a Ray cluster; pass its --address")
            cluster = LocalCluster(nodes_for(exp)).start()
            connect(cluster.address)
        check_capacity(exp)
        yield ray.get_runtime_context().gcs_address
    finally:
        if not was_connected and ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def object_store_usage(address: str) -> tuple[int, int]:
    """``(MiB, objects)`` held in the cluster's object stores (from the raylets; no dashboard needed).

    Asked of this process's own node's raylet: Ray would ask the first node the GCS lists as
    alive, which may be one just killed that the GCS has not yet declared dead."""
    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    reply = get_memory_info_reply(get_state_from_address(address), node["NodeManagerAddress"], node["NodeManagerPort"])
    text = store_stats_summary(reply)
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    if match is None:
        raise RuntimeError(f"unexpected memory summary from Ray: {text[:200]!r}")
    return int(match.group(1)), int(match.group(2))
