"""clusters/: the shipped experiments, the AWS cluster definitions, and clusters/laptop.sh for real.

The laptop-cluster tests start their own cluster with ``clusters/laptop.sh up`` on ports of
their own (not the script's defaults, not Ray's) and a private state directory, and stop it with
``clusters/laptop.sh down``; the last of them checks that ``down`` stopped exactly that
cluster's processes while the session cluster (tests/conftest.py) kept running. The launcher
test (``ray up``/``ray down``, which run ``ray stop``) lives in tests/launcher/.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

import hetero_sched as hs
from hetero_sched.cli import RUNS_DIR_ENV, _default_out
from hetero_sched.errors import UserError
from hetero_sched.experiment import load_experiment
from hetero_sched.runtime.cluster import LocalCluster, check_capacity, group_pool
from hetero_sched.runtime.journal import replay

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAPTOP = CLUSTERS / "laptop.sh"
DATACENTER = "datacenter-trn2-cs3.yaml"
"""Sized for a region (320 groups, 1M requests), not a laptop: tests/test_fleet.py simulates a slice."""
EXPERIMENTS = sorted(p for p in (CLUSTERS / "experiments").glob("*.yaml")
                     if "axes" not in yaml.safe_load(p.read_text()) and p.name != DATACENTER)
"""The experiments shipped in clusters/experiments for the laptop cluster (sweep specs, which
have ``axes``, excluded)."""
AWS_CONFIGS = {"aws-trn2-cs3.yaml": "trn2-cs3.yaml", "aws-trn3-cs3.yaml": "trn3-cs3.yaml"}
"""Each AWS cluster definition and the shipped experiment it is sized for."""

GCS_PORT, DASHBOARD_PORT = 26479, 28365
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
TEST_PORTS = ["--port", str(GCS_PORT), "--dashboard-port", str(DASHBOARD_PORT), "--client-port", "20101",
              "--node-port-base", "23400", "--worker-ports", "25000-25499"]
"""Ports of the test's laptop cluster: none of laptop.sh's defaults, laptop.yaml's or Ray's."""
TEST_SHAPE = ["--prefill-devices", "trn2", "--prefill-nodes", "2", "--neuron-cores", "128",
              "--decode-nodes", "1", "--cs3", "4", "--gpu-nodes", "0"]
"""Two 128-core Trainium2 prefill nodes (two TP64 groups each) and one 4-system CS-3 node."""


def _run(cmd: list[str | Path], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _plan(*flags: str) -> list[dict[str, Any]]:
    """``laptop.sh plan``: the nodes ``up`` would start, as ``ray.nodes()``-like entries."""
    out = _run([LAPTOP, "plan", *flags])
    assert out.returncode == 0, out.stderr
    nodes = [json.loads(line) for line in out.stdout.splitlines()]
    return [{"Alive": True, "NodeName": n["name"], "Resources": {k: float(v) for k, v in n["resources"].items()},
             "Labels": n["labels"]} for n in nodes]


# ---------------------------------------------------------------- experiments (no Ray)

@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiment_simulates_and_fits_the_default_laptop_cluster(path: Path) -> None:
    """Each shipped experiment validates, simulates every request, and its groups fit the
    nodes ``laptop.sh up`` starts by default (the runtime's own capacity check)."""
    exp, _ = load_experiment(path)
    result = hs.simulate(path)
    assert result.summary["completed"] == result.summary["requests"] == exp.workload.num_requests
    assert result.summary["rejected"] == 0
    check_capacity(exp, _plan())


def test_default_laptop_cluster_is_the_one_documented() -> None:
    """Defaults: a head, Trainium2 and Trainium3 prefill nodes, a CS-3 decode node, an H100
    node, each with the resources and labels its groups' actors ask for."""
    nodes = {n["NodeName"]: n for n in _plan()}
    assert sorted(nodes) == ["cs3-decode-0", "h100-both-0", "head", "trn2-prefill-0", "trn3-prefill-0"]
    assert nodes["head"]["Labels"] == {"hetero.node": "head"} and set(nodes["head"]["Resources"]) == {"CPU"}
    assert nodes["trn2-prefill-0"]["Resources"]["neuron_cores"] == 256
    assert nodes["trn3-prefill-0"]["Labels"] == {"hetero.device": "trn3", "hetero.pool": "prefill",
                                                 "hetero.node": "trn3-prefill-0"}
    assert nodes["cs3-decode-0"]["Resources"]["cs3"] == 4
    assert nodes["h100-both-0"]["Resources"]["GPU"] == 48
    assert nodes["h100-both-0"]["Labels"]["hetero.pool"] == "both"


def test_an_experiment_that_does_not_fit_is_named() -> None:
    """The capacity check the test above relies on can fail: one 128-core prefill node holds
    two of the seed design's four TP64 groups, not four."""
    exp, _ = load_experiment(CLUSTERS / "experiments" / "trn2-cs3.yaml")
    with pytest.raises(UserError, match="group trn2-prefill"):
        check_capacity(exp, _plan("--neuron-cores", "128"))


def test_runs_default_to_a_lasting_folder_inside_a_ray_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A job's working directory is a copy Ray deletes: its default run folder is under ~."""
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _default_out("x").parent == Path("runs")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert _default_out("x").parent == tmp_path / "hetero-sched-runs"
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "mine"))
    assert _default_out("x").parent == tmp_path / "mine"


# ---------------------------------------------------------------- AWS definitions (no Ray)

@pytest.mark.parametrize("name", sorted(AWS_CONFIGS))
def test_aws_config_passes_ray_validation_and_hosts_its_experiment(name: str) -> None:
    """Ray's own cluster-config schema validation (what ``ray up`` runs) accepts the file; its
    node types carry the resources and labels placement needs, and at full size (max_workers
    of each type) the cluster can host the experiment it is made for."""
    config = yaml.safe_load((CLUSTERS / name).read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["labels"] == {"hetero.node": "head"}
    prefill = [t for t in types.values() if t["labels"].get("hetero.pool") == "prefill"]
    decode = [t for t in types.values() if t["labels"].get("hetero.pool") == "decode"]
    assert len(prefill) == 1 and prefill[0]["resources"] == {"neuron_cores": 64}  # one trn*.48xlarge, LNC=2
    assert len(decode) == 1 and decode[0]["labels"]["hetero.device"] == "cs3" and decode[0]["resources"]["cs3"] >= 1
    head = prepared["head_node_type"]
    nodes = [{"Alive": True, "Resources": {k: float(v) for k, v in t["resources"].items()}, "Labels": t["labels"]}
             for name_, t in types.items() for _ in range(1 if name_ == head else t["max_workers"])]
    exp, _ = load_experiment(CLUSTERS / "experiments" / AWS_CONFIGS[name])
    check_capacity(exp, nodes)
    devices = {g.device for g in exp.groups}
    assert devices == {t["labels"]["hetero.device"] for t in (*prefill, *decode)}


def test_ray_validation_rejects_a_broken_node_type() -> None:
    """The validation above can fail: a fractional or textual resource count is refused."""
    config = yaml.safe_load((CLUSTERS / "aws-trn2-cs3.yaml").read_text())
    config["available_node_types"]["trn2-prefill"]["resources"] = {"neuron_cores": "64"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


# ---------------------------------------------------------------- laptop.sh input (no Ray)

@pytest.mark.parametrize("args, message", [
    (["up", "--cs3", "four"], "--cs3 must be a non-negative integer"),
    (["up", "--worker-ports", "9"], "--worker-ports must be A-B"),
    (["up", "--gpus"], "--gpus needs a value"),
    (["launch"], "unknown command 'launch'"),
    (["status"], "no laptop cluster state"),
])
def test_laptop_sh_bad_input_is_one_line_and_status_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = _run([LAPTOP, *args], env={**os.environ, "HETERO_LAPTOP_DIR": str(tmp_path / "none")})
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- launcher.sh (no Ray started)

LAUNCHER = CLUSTERS / "launcher.sh"


def test_launcher_sh_makes_the_login_shells_python_the_callers_virtual_environment(tmp_path: Path) -> None:
    """What ``ray up`` / ``ray submit`` run on the head is the login shell's ``python``/``ray``:
    ``launcher.sh env`` (run by ``launcher.sh up`` before ``ray up``) makes those the caller's
    venv. Here in a scratch HOME; the full ``ray up`` run is ``tests/launcher`` (not run here:
    it runs ``ray stop``)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export KEEP_ME=1\n")
    env = {**os.environ, "HOME": str(home), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    env.pop("HETERO_SCHED_PYTHON", None)
    out = _run([LAUNCHER, "env"], env=env)
    assert out.returncode == 0, out.stderr
    login = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin"}   # a login shell knows nothing else
    probe = _run(["bash", "--login", "-c", "-i", "source ~/.bashrc; python -c 'import sys, hetero_sched; "
                  "print(sys.prefix)' && ray --version"], env=login)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0] == str(venv) and "version" in probe.stdout
    again = _run([LAUNCHER, "env"], env=env)                  # idempotent: one block, the user's lines kept
    assert again.returncode == 0 and (home / ".bashrc").read_text().count("hetero-sched launcher >>>") == 1
    assert "KEEP_ME" in (home / ".bashrc").read_text()
    bare = tmp_path / "bare"                                     # an environment without hetero-sched
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    bad = _run([LAUNCHER, "env"], env={**env, "HETERO_SCHED_PYTHON": str(bare / "bin" / "python"), "PYTHONPATH": ""})
    assert bad.returncode == 2 and "cannot import hetero_sched and ray" in bad.stderr


# ---------------------------------------------------------------- laptop.sh for real

@dataclass(frozen=True)
class Laptop:
    """A running test laptop cluster: its state directory, a client environment, bring-up time."""

    state: Path
    env: dict[str, str]
    up_s: float

    @property
    def token(self) -> str:
        return (self.state / "auth_token").read_text().strip()

    def get(self, path: str) -> Any:
        """GET a dashboard API path with the token; the decoded JSON."""
        req = urllib.request.Request(DASHBOARD + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())


def _pgids(state: Path) -> list[int]:
    return [int((p.read_text().split() or ["0"])[0]) for p in (state / "nodes").glob("*.pid")]


def _alive_in_group(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(a) for a, b in (line.split() for line in out.splitlines()) if int(b) == pgid]


@pytest.fixture(scope="module")
def laptop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Laptop]:
    """``laptop.sh up`` with the test's ports and shape; ``laptop.sh down`` afterwards."""
    state = tmp_path_factory.mktemp("laptop")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["HETERO_LAPTOP_DIR"] = str(state)
    t0 = time.monotonic()
    up = _run([LAPTOP, "up", *TEST_SHAPE, *TEST_PORTS], env=env)
    up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, f"laptop.sh up failed:\n{up.stdout}\n{up.stderr}"
        client = dict(env)  # what `eval "$(clusters/laptop.sh env)"` sets
        for line in _run([LAPTOP, "env"], env=env).stdout.splitlines():
            if line.startswith("export "):
                key, value = line.removeprefix("export ").split("=", 1)
                client[key] = shlex.split(value)[0]
        assert client["RAY_AUTH_TOKEN_PATH"] == str(state / "auth_token")
        assert client["RAY_API_SERVER_ADDRESS"] == DASHBOARD and client["RAY_ADDRESS"] == f"127.0.0.1:{GCS_PORT}"
        print(f"laptop cluster up in {up_s:.1f} s")
        yield Laptop(state, client, up_s)
    finally:
        _run([LAPTOP, "down"], env=env)
        for line in (state / "cluster.env").read_text().splitlines() if (state / "cluster.env").exists() else []:
            if line.startswith("temp_dir="):  # the nodes' session directories (logs, sockets)
                shutil.rmtree(line.split("=", 1)[1].strip("'"), ignore_errors=True)


def test_laptop_status_lists_labelled_nodes(laptop: Laptop) -> None:
    """``status`` shows every node alive with its resources and labels, as the cluster reports them."""
    out = _run([LAPTOP, "status"], env=laptop.env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if " ALIVE " in line}
    assert sorted(rows) == ["cs3-decode-0", "head", "trn2-prefill-0", "trn2-prefill-1"]
    assert "neuron_cores=128" in rows["trn2-prefill-1"] and "hetero.pool=prefill" in rows["trn2-prefill-1"]
    assert "cs3=4" in rows["cs3-decode-0"] and "hetero.device=cs3" in rows["cs3-decode-0"]
    assert "hetero.node=head" in rows["head"]


def test_laptop_up_is_idempotent(laptop: Laptop) -> None:
    """A second ``up`` with the same flags leaves the cluster as it is; other sizes are refused."""
    before = sorted(_pgids(laptop.state))
    again = _run([LAPTOP, "up", *TEST_SHAPE, *TEST_PORTS], env=laptop.env)
    assert again.returncode == 0 and "already up" in again.stdout
    assert sorted(_pgids(laptop.state)) == before
    other = _run([LAPTOP, "up", *TEST_SHAPE, "--cs3", "8", *TEST_PORTS], env=laptop.env)
    assert other.returncode == 2 and "other sizes is already up" in other.stderr


def test_laptop_refuses_clients_without_the_token(laptop: Laptop, tmp_path: Path) -> None:
    """Token auth is on: the job API answers 401 without a token and 403 with a wrong one, and
    ``ray job submit`` without the token fails with an authentication error."""
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(DASHBOARD + "/api/jobs/", headers=headers), timeout=10)
        assert refused.value.code == code
    assert isinstance(laptop.get("/api/jobs/"), list)  # with the token
    no_token = {k: v for k, v in laptop.env.items() if not k.startswith("RAY_AUTH")}
    no_token.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled")  # no ~/.ray/auth_token either
    out = _run(["ray", "job", "submit", "--address", DASHBOARD, "--", "echo", "hi"], env=no_token, timeout=60)
    assert out.returncode != 0
    assert "AuthenticationError" in out.stderr and "Missing authentication token" in out.stderr
    assert not [j for j in laptop.get("/api/jobs/") if j.get("entrypoint") == "echo hi"]


def test_job_submit_runs_an_experiment_on_the_labelled_nodes(laptop: Laptop, tmp_path: Path) -> None:
    """``ray job submit --working-dir . -- hetero-sched run clusters/experiments/trn2-cs3.yaml
    --address auto`` succeeds; the job prints its run folder; every device-group actor sat on a
    node whose labels name its device and pool — from the run's own record and, independently,
    from the cluster's actor table (four TP64 prefill actors split two per 128-core node)."""
    submission = f"test-{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    runtime_env = json.dumps({"env_vars": {RUNS_DIR_ENV: str(runs)}})
    t0 = time.monotonic()
    out = _run(["ray", "job", "submit", "--address", DASHBOARD, "--submission-id", submission,
                "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
                "hetero-sched", "run", "clusters/experiments/trn2-cs3.yaml", "--address", "auto"],
               env=laptop.env, timeout=300)
    job_s = time.monotonic() - t0
    print(f"job {submission} finished in {job_s:.1f} s")
    assert out.returncode == 0, f"job failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert f"Job '{submission}' succeeded" in out.stdout + out.stderr
    folder = Path([line for line in out.stdout.splitlines() if line.startswith("run folder: ")][-1].split(": ", 1)[1])
    assert folder.is_absolute() and folder.parent == runs
    written = json.loads((folder / "summary.json").read_text())
    assert written["summary"]["completed"] == written["summary"]["requests"] == 40
    journal = replay(folder / "scheduler.journal")      # the scheduler journaled the run in its folder
    assert journal.num_finished == 40 and journal.pending == {}

    exp, _ = load_experiment(CLUSTERS / "experiments" / "trn2-cs3.yaml")
    wanted = {g.name: (g.device, group_pool(g)) for g in exp.groups}
    for p in written["stamp"]["placement"]:
        base = p["group"] if p["group"] in wanted else p["group"].rsplit("-", 1)[0]
        device, pool = wanted[base]
        assert (p["node_labels"]["hetero.device"], p["node_labels"]["hetero.pool"]) == (device, pool), p

    job_id = laptop.get(f"/api/jobs/{submission}")["job_id"]
    nodes = laptop.get("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
    node_name = {n["node_id"]: n["labels"]["hetero.node"] for n in nodes}
    actors = laptop.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    mine = [a for a in actors if a["job_id"] == job_id]
    hosts = Counter(node_name[a["node_id"]] for a in mine if a["class_name"] == "DeviceGroupActor")
    assert hosts == {"trn2-prefill-0": 2, "trn2-prefill-1": 2, "cs3-decode-0": 1}


def test_a_failing_job_fails_the_submit_with_the_reason(laptop: Laptop) -> None:
    """Exit codes carry through: an experiment the cluster cannot host (no H100 node here) is
    ``hetero-sched`` exit status 2 with one line naming the group, so the job fails and
    ``ray job submit`` exits non-zero."""
    out = _run(["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
                "hetero-sched", "run", "clusters/experiments/h100-colocated.yaml", "--address", "auto"],
               env=laptop.env, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "error: group h100-tp8" in out.stdout and "needs nodes labelled hetero.device=h100" in out.stdout
    assert "failed with exit code 2" in out.stdout + out.stderr


def test_job_submit_serves_the_cluster_over_http_until_stopped(laptop: Laptop) -> None:
    """``ray job submit -- hetero-sched serve clusters/experiments/trn2-cs3.yaml --address auto``:
    the job's server answers /ready and a completion on the labelled nodes; ``ray job stop``
    ends it (the server closes its port)."""
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    submission = f"serve-{uuid.uuid4().hex[:8]}"
    out = _run(["ray", "job", "submit", "--address", DASHBOARD, "--submission-id", submission, "--no-wait",
                "--working-dir", ".", "--", "hetero-sched", "serve", "clusters/experiments/trn2-cs3.yaml",
                "--address", "auto", "--port", str(port)], env=laptop.env, timeout=120)
    assert out.returncode == 0, out.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if urllib.request.urlopen(url + "/ready", timeout=5).status == 200:
                    break
            except OSError:
                pass
            status = laptop.get(f"/api/jobs/{submission}")["status"]
            assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, f"job {status}"
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="on the laptop cluster", max_tokens=8)
        assert reply.usage.completion_tokens == 8
    finally:
        _run(["ray", "job", "stop", "--address", DASHBOARD, submission], env=laptop.env, timeout=120)
    deadline = time.monotonic() + 60
    while laptop.get(f"/api/jobs/{submission}")["status"] not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_laptop_down_stops_exactly_its_processes(laptop: Laptop, ray_cluster: LocalCluster) -> None:
    """``down`` leaves none of the laptop cluster's processes and closes its ports; the session
    cluster (another Ray cluster on this machine) keeps running."""
    pgids = _pgids(laptop.state)
    assert len(pgids) == 4 and all(_alive_in_group(g) for g in pgids)
    session_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    down = _run([LAPTOP, "down"], env=laptop.env)
    assert down.returncode == 0, down.stderr
    assert not [g for g in pgids if _alive_in_group(g)]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", GCS_PORT)) != 0
    assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == session_nodes
    assert "not running" in _run([LAPTOP, "down"], env=laptop.env).stdout  # idempotent
