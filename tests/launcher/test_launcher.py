"""``ray up`` + ``ray submit`` + ``ray down`` of ``clusters/laptop.yaml``, for real, over SSH to
127.0.0.1 (the cluster launcher's local provider).

Marked ``launcher`` and deselected from a plain ``python -m pytest`` (tests/launcher/conftest.py):
``ray up`` and ``ray down`` run ``ray stop``, which stops every Ray cluster on the machine. Run
it alone: ``python -m pytest -m launcher tests/launcher`` (``.ci/run`` does, after the main
suite). Needs passwordless SSH to 127.0.0.1 (``clusters/ssh-loopback.sh up``; ``.ci/run`` sets it
up).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.launcher

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "clusters" / "laptop.yaml"
PROBE = Path(__file__).with_name("hetero_sched_probe.py")
EXPERIMENT = ROOT / "clusters" / "experiments" / "trn2-cs3.yaml"
BASHRC = Path.home() / ".bashrc"
BEGIN, END = "# >>> hetero-sched launcher test >>>", "# <<< hetero-sched launcher test <<<"
STEP_TIMEOUT_S = 240


def _leftovers() -> set[Path]:
    """Files the launcher leaves behind (config cache, SSH control sockets, bootstrap files)."""
    tmp = Path("/tmp")
    return {*tmp.glob("ray-config-*"), *tmp.glob("ray_ssh_*"), *Path.home().glob("ray_bootstrap_*"),
            *Path("/tmp/ray").glob("cluster-hetero-laptop.*"), Path.home() / PROBE.name}


def _config_values() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ray_bin() -> str:
    """The ``ray`` CLI of this interpreter (beside it in a venv, else on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_ray_bin(), *args], capture_output=True, text=True, timeout=STEP_TIMEOUT_S, cwd=ROOT)


def _wait_closed(port: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _port_open(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


LAUNCHER = ROOT / "clusters" / "launcher.sh"


def _ssh_works() -> None:
    ssh = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
                          "-o", "UserKnownHostsFile=/dev/null", "127.0.0.1", "true"], capture_output=True, text=True)
    if ssh.returncode != 0:
        pytest.fail(f"ssh 127.0.0.1 does not work ({ssh.stderr.strip()}): run clusters/ssh-loopback.sh up")


def _config_for_this_user(tmp_path: Path) -> Path:
    """``clusters/laptop.yaml`` itself when its ``ssh_user`` is this user, else a copy differing
    only in ``auth.ssh_user``."""
    values = _config_values()
    if values["auth"]["ssh_user"] == getpass.getuser():
        return CONFIG
    values["auth"]["ssh_user"] = getpass.getuser()
    config = tmp_path / "laptop.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


@contextmanager
def _head_shell(tmp_path: Path, *exports: str) -> Iterator[Path]:
    """The head's login-shell environment, as a ``~/.bashrc`` block at its end: ``exports``,
    token auth with a fresh token file (yielded). Afterwards the block is removed with the files
    the launcher left that were not there before."""
    _ssh_works()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    block = "\n".join(["", BEGIN, *exports, "export RAY_AUTH_MODE=token",
                       f"export RAY_AUTH_TOKEN_PATH={shlex.quote(str(token))}", END, ""])
    original = BASHRC.read_text() if BASHRC.exists() else None
    before = {p for p in _leftovers() if p.exists()}
    BASHRC.write_text((original or "") + block)
    try:
        yield token
    finally:
        if original is None:
            BASHRC.unlink(missing_ok=True)
        else:
            BASHRC.write_text(original)
        for p in _leftovers() - before:
            if p.is_dir() and not p.is_symlink():
                subprocess.run(["rm", "-rf", str(p)], check=False)
            else:
                p.unlink(missing_ok=True)


@pytest.fixture
def launcher_env(tmp_path: Path) -> Iterator[Path]:
    """``python`` (``ray submit`` runs ``python SCRIPT``) and ``ray`` first on PATH as links to this
    interpreter and its ``ray``, the repository importable, in the head's ``~/.bashrc``. Yields
    the config to use (``_config_for_this_user``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "ray").symlink_to(_ray_bin())
    with _head_shell(tmp_path, f"export PATH={shlex.quote(str(bin_dir))}:$PATH",
                     f"export PYTHONPATH={shlex.quote(str(ROOT))}"):
        yield _config_for_this_user(tmp_path)


def test_ray_up_submit_down(launcher_env: Path) -> None:
    """The cluster comes up from the YAML, a submitted script runs an experiment on its labelled
    nodes, the dashboard refuses a client without the token, and ``ray down`` stops it all."""
    config = str(launcher_env)
    head = next(c for c in _config_values()["head_start_ray_commands"] if " --head " in c)
    gcs_port = int(re.search(r"\s--port=(\d+)", head).group(1))  # type: ignore[union-attr]
    dashboard_port = int(re.search(r"\s--dashboard-port=(\d+)", head).group(1))  # type: ignore[union-attr]
    times: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        up = _ray("up", "-y", "--no-config-cache", config)
        times["up_s"] = time.monotonic() - t0
        assert up.returncode == 0, f"ray up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        assert _port_open(gcs_port) and _port_open(dashboard_port)

        # Token auth is on: a client without the token is turned away by the job API.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/jobs/", timeout=10)
        assert refused.value.code == 401

        t1 = time.monotonic()
        sub = _ray("submit", config, str(PROBE), str(EXPERIMENT), "8")
        times["submit_s"] = time.monotonic() - t1
        assert sub.returncode == 0, f"ray submit failed:\n{sub.stdout[-3000:]}\n{sub.stderr[-3000:]}"
        line = [s for s in (sub.stdout + sub.stderr).splitlines() if s.startswith('{"requests"')][-1]
        out = json.loads(line)
        assert out["completed"] == out["requests"] == 8
        want = {"trn2-prefill": ("trn2", "prefill", "trn2-prefill-0"), "cs3-decode": ("cs3", "decode", "cs3-decode-0")}
        assert len(out["placement"]) == 5  # four prefill replicas, one decode group
        for p in out["placement"]:
            device, pool, node = want[re.sub(r"-\d+$", "", p["group"])]  # replicas are <group>-<i>
            labels = p["node_labels"]
            assert (labels["hetero.device"], labels["hetero.pool"], labels["hetero.node"]) == (device, pool, node), p
    finally:
        t2 = time.monotonic()
        down = _ray("down", "-y", config)
        times["down_s"] = time.monotonic() - t2
        print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    assert down.returncode == 0, f"ray down failed:\n{down.stdout[-3000:]}\n{down.stderr[-3000:]}"
    assert _wait_closed(gcs_port) and _wait_closed(dashboard_port)


def test_launcher_sh_runs_the_head_and_the_submitted_script_with_a_virtual_environments_python(tmp_path: Path) -> None:
    """A user who installed hetero-sched in a virtual environment: ``clusters/launcher.sh up``
    from that environment makes the head's ``ray start``, its workers and ``ray submit``'s
    ``python SCRIPT`` all run the environment's interpreter (issue 16: the login shell's
    ``python`` had no numpy). ``~/.bashrc`` carries only the token settings here, not PATH."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    prefix = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    config = _config_for_this_user(tmp_path)
    wrapper_ray = Path.home() / ".hetero-sched" / "launcher" / "bin" / "ray"
    with _head_shell(tmp_path) as token:                       # ~/.bashrc: token settings only, no PATH
        env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
               "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        try:
            up = subprocess.run([str(LAUNCHER), "up", str(config)], capture_output=True, text=True, env=env,
                                timeout=STEP_TIMEOUT_S, cwd=ROOT)
            assert up.returncode == 0, f"launcher.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
            sub = subprocess.run([str(wrapper_ray), "submit", str(config), str(PROBE), str(EXPERIMENT), "4"],
                                 capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT_S, cwd=ROOT)
            assert sub.returncode == 0, f"ray submit failed:\n{sub.stdout[-3000:]}\n{sub.stderr[-3000:]}"
            out = json.loads([s for s in (sub.stdout + sub.stderr).splitlines() if s.startswith('{"requests"')][-1])
            assert out["completed"] == out["requests"] == 4
            assert out["python_prefix"] == prefix, "the submitted script ran another interpreter"
            assert out["worker_prefix"] == prefix, "the head's Ray workers run another interpreter"
        finally:
            down = subprocess.run([str(LAUNCHER), "down", str(config)], capture_output=True, text=True, env=env,
                                  timeout=STEP_TIMEOUT_S, cwd=ROOT)
            after = BASHRC.read_text() if BASHRC.exists() else ""
    assert down.returncode == 0, f"launcher.sh down failed:\n{down.stdout[-3000:]}\n{down.stderr[-3000:]}"
    assert "# >>> hetero-sched launcher >>>" not in after, "launcher.sh down left its ~/.bashrc block"
    assert not wrapper_ray.exists(), "launcher.sh down left its ray wrapper"
