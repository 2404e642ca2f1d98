"""Every issue-7 policy and transfer option in the live runtime on the virtual clock: the same
decisions and records as the simulator (modeled backend), and token-exact chunked prefill
with the numpy tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest

import hetero_sched as hs
from hetero_sched.core.events import DecisionKind as D
from hetero_sched.runtime.live import run_live
from hetero_sched.workload import Workload

from helpers import colocated_experiment, disagg_experiment
from test_runtime import _reference_tokens, _tiny_experiment

pytestmark = pytest.mark.ray


def _prefix_workload(n: int = 120, block: int = 64) -> Workload:
    """Requests from four prompt families sharing prefix blocks (hand-made hashes)."""
    rng = np.random.default_rng(4)
    families = [tuple(int(x) for x in rng.integers(0, 1 << 40, 6)) for _ in range(4)]
    hashes = [families[i % 4][: int(rng.integers(2, 7))] for i in range(n)]
    prompts = np.array([len(h) * block for h in hashes])
    return Workload("prefix", np.sort(rng.uniform(0, 6, n)), prompts, rng.integers(5, 60, n),
                    prefix_hashes=hashes, prefix_block_tokens=block)


CASES = {
    "disagg-slo": (disagg_experiment(policy="disagg-slo", slo={"ttft_s": 0.04, "tpot_s": 0.05}), None, D.REJECT),
    "disagg-prefix": (disagg_experiment(policy="disagg-prefix"), _prefix_workload(), None),
    "p2c+fallback": (disagg_experiment(policy={"name": "disagg", "params": {"choices": 2, "fallback": True}},
                                       groups=[dict(disagg_experiment()["groups"][0]),     # a decode group of
                                               dict(disagg_experiment()["groups"][1], max_num_seqs=4)]),  # 4 slots
                     None, None),
    "adaptive": (disagg_experiment(policy={"name": "adaptive", "params": {"mixed_pool": "prefill"}}), None, D.ROLE),
    "layerwise": (disagg_experiment(transfer={"mode": "layerwise"}), None, None),
    "colocated-chunked": (colocated_experiment(policy={"name": "colocated-chunked", "params": {"token_budget": 256}}),
                          None, D.CHUNK),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_virtual_clock_run_of_each_policy_equals_the_simulator(ray_cluster, case):
    exp, workload, must_see = CASES[case]
    if workload is None:
        exp = dict(exp, workload=dict(exp["workload"], num_requests=150))
    live = run_live(exp, address=ray_cluster.address, clock="virtual", workload=workload)
    sim = hs.simulate(exp, workload=workload)
    assert len(live.decisions) == len(sim.decisions) > 150
    assert live.decisions == sim.decisions
    # rejected requests have NaN latencies, and NaN != NaN in Table.equals: compare the text
    assert live.records.schema == sim.records.schema
    assert repr(live.records.to_pylist()) == repr(sim.records.to_pylist())
    assert live.summary["runtime"]["kv_held_after_run"] == 0
    if must_see is not None:
        assert any(d[1] == must_see for d in sim.decisions), f"{case} never made a {must_see} decision"
    if case == "disagg-prefix":
        assert sum(sim.records.column("cached_tokens").to_pylist()) > 0
    if case == "p2c+fallback":
        rows = sim.records.to_pylist()
        assert any(r["prefill_group"] == r["decode_group"] for r in rows), "no fallback decode happened"


def test_chunked_prefill_on_the_numpy_backend_is_token_exact(ray_cluster):
    exp = _tiny_experiment(groups=[{"name": "h", "device": "h100", "count": 1, "role": "both"}],
                           policy={"name": "colocated-chunked", "params": {"token_budget": 48}})
    r = run_live(exp, address=ray_cluster.address, clock="virtual", backend="numpy")
    assert r.summary["completed"] == 60
    chunks = [d for d in r.decisions if d[1] == D.CHUNK]
    assert any(d[4][0] > 0 for d in chunks), "chunks must ride along with decode steps"
    assert len(chunks) > 60, "prompts of up to 200 tokens must be split at a 48-token budget"
    assert _reference_tokens(r, seed=1) > 1e-6
