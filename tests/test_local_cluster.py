"""The local cluster flow end to end: ``scripts/local_cluster.sh`` start -> submit -> stop.

A head node with token authentication starts in a temp dir on free ports (another Ray cluster
on the host may hold the default ones; workers bind ports the OS chooses); every port of the
cluster listens on loopback only; the job API refuses requests without the token; ``ray job
submit --working-dir`` runs the whole pipeline job on a reduced CPU demo (every stage: vLLM
summaries, Ray Train, scoring) to SUCCEEDED; its logs, outputs and ``metrics.json`` are checked;
``stop`` leaves no process of this cluster behind (and never runs ``ray stop``). ``STAGES`` can
restrict the job to some stages while developing.

The fast tests check the script's state handling without Ray: a state dir that is not ours or
not mode 700 is refused, and the state file is read as data (a planted ``$(...)`` never runs).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import file_module
import pytest
from reduced_demo import REDUCED_DEMO

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_cluster.sh"
STAGES: list[str] | None = None
"""Pipeline stages the test job runs (``None``: all of them)."""


def _helper():
    return file_module.load("_local_cluster", SCRIPT.with_name("_local_cluster.py"))


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _name_and_cmdline(process) -> tuple[str, str]:
    """A psutil process's name and command line ("" for a process that has gone)."""
    import psutil

    try:
        return process.name(), " ".join(process.cmdline())
    except psutil.Error:
        return "", ""


def _state(state_dir: Path) -> dict[str, str]:
    lines = (state_dir / "cluster.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


# --------------------------------------------------------------------------- fast: state handling

CLUSTER_ID = "ab" * 16


def _bash(code: str, state_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in bash with the script's functions loaded (sourcing it runs no command)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full_env.update(MLLM_MSR_RAY_DIR=str(state_dir), **env)
    return subprocess.run(
        ["bash", "-c", f'source "$1"; {code}', "bash", str(SCRIPT), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _read_state(state_dir: Path) -> subprocess.CompletedProcess:
    fields = '"$RAY_PID" "$CLUSTER_ID" "$DASHBOARD_URL" "$GCS_PORT" "$TOKEN_FILE"'
    return _bash(f"read_state; printf '%s\\n' {fields}", state_dir)


def _write_state(state_dir: Path, extra: str = "", **values: str) -> Path:
    state = {
        "RAY_PID": "4242",
        "CLUSTER_ID": CLUSTER_ID,
        "DASHBOARD_URL": "http://127.0.0.1:8265",
        "GCS_PORT": "6379",
        "TOKEN_FILE": f"{state_dir}/auth_token",
        **values,
    }
    path = state_dir / "cluster.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in state.items()) + extra)
    return path


@pytest.fixture
def state_dir(tmp_path) -> Path:
    path = tmp_path / "c"
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def test_state_file_is_read_as_data(state_dir):
    _write_state(state_dir)
    out = _read_state(state_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "4242",
        CLUSTER_ID,
        "http://127.0.0.1:8265",
        "6379",
        f"{state_dir}/auth_token",
    ]
    env = _bash('"cmd_env"', state_dir)
    assert env.returncode == 0, env.stderr
    assert "RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265" in env.stdout
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in env.stdout  # loopback node IP


@pytest.mark.parametrize(
    "planted",
    [
        "CLUSTER_ID=$(touch {marker})",
        "RAY_PID=1; touch {marker}",
        "TOKEN_FILE=`touch {marker}`",
        "DASHBOARD_URL=http://127.0.0.1:1$(touch {marker})",
        "GCS_PORT=6379 $(touch {marker})",
        "touch {marker}",
        "$(touch {marker})=1",
        "BASH_ENV={marker}",
        "PATH=/tmp",
    ],
)
def test_a_planted_state_file_is_refused_and_never_run(state_dir, tmp_path, planted):
    marker = tmp_path / "pwned"
    _write_state(state_dir, extra=planted.format(marker=marker) + "\n")
    for run in (
        lambda: _read_state(state_dir),
        lambda: _run(["stop"], {**os.environ, "MLLM_MSR_RAY_DIR": str(state_dir)}, timeout=60),
    ):
        out = run()
        assert out.returncode != 0 and "local_cluster:" in out.stderr, out.stdout + out.stderr
        assert "cluster.env line 6" in out.stderr, out.stderr
        assert not marker.exists()


@pytest.mark.parametrize(
    "values",
    [
        {"RAY_PID": "12abc"},
        {"CLUSTER_ID": "not-hex"},
        {"DASHBOARD_URL": "http://0.0.0.0:8265"},
        {"TOKEN_FILE": "/home/someone/else/token"},
    ],
)
def test_invalid_state_values_are_refused(state_dir, values):
    _write_state(state_dir, **values)
    out = _read_state(state_dir)
    assert out.returncode != 0 and "invalid value for" in out.stderr, out.stderr


def test_a_state_dir_with_mode_0755_is_refused(state_dir):
    _write_state(state_dir)
    state_dir.chmod(0o755)
    out = _read_state(state_dir)
    assert out.returncode != 0 and "has mode 755, not 700" in out.stderr, out.stderr
    (state_dir / "cluster.env").unlink()
    # `start` refuses before it writes anything (a bad port would stop Ray at once anyway).
    env = {**os.environ, "MLLM_MSR_RAY_DIR": str(state_dir), "MLLM_MSR_RAY_PORT": "x"}
    started = _run(["start"], {**env, "MLLM_MSR_RAY_START_TIMEOUT": "1"}, timeout=60)
    assert started.returncode != 0 and "not 700" in started.stderr, started.stderr
    assert list(state_dir.iterdir()) == []


def test_a_state_dir_of_another_user_or_a_symlink_is_refused(state_dir, tmp_path):
    _write_state(state_dir)
    link = tmp_path / "link"
    link.symlink_to(state_dir)
    out = _read_state(link)
    assert out.returncode != 0 and "is a symlink" in out.stderr, out.stderr
    if os.geteuid() == 0:
        os.chown(state_dir, 65534, 65534)  # nobody
        foreign = state_dir
    else:
        foreign = Path("/")  # root's
        assert foreign.stat().st_uid != os.geteuid()
    out = _read_state(foreign)
    assert out.returncode != 0 and "is not owned by you" in out.stderr, out.stderr


def test_stop_leaves_a_recorded_pid_alone_without_the_cluster_marker():
    """A recorded PID that now belongs to another process (PID reuse) is not stopped."""
    helper = _helper()
    env = {k: v for k, v in os.environ.items() if k != helper.MARKER_VAR}
    stranger = subprocess.Popen(["sleep", "30"], env=env)
    ours = subprocess.Popen(["sleep", "30"], env={**env, helper.MARKER_VAR: CLUSTER_ID})
    try:
        assert helper.cluster_processes(stranger.pid, CLUSTER_ID) == [
            p for p in helper.cluster_processes(ours.pid, CLUSTER_ID) if p.pid == ours.pid
        ]
        assert [p.pid for p in helper.cluster_processes(stranger.pid, CLUSTER_ID)] == [ours.pid]
        helper.stop(stranger.pid, CLUSTER_ID, grace_s=5)
        assert ours.wait(timeout=10) is not None
        assert stranger.poll() is None  # still running
    finally:
        for proc in (stranger, ours):
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- slow: a real cluster


def _listening_addresses(pids: set[int]) -> set[str]:
    import psutil

    return {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


@pytest.mark.slow
@pytest.mark.timeout(600)  # 120-260 s on a quiet machine; timed out at 300 s under load
def test_local_cluster_token_auth_submit_and_stop() -> None:
    work = Path(tempfile.mkdtemp(prefix="mmc-"))  # short: Ray's socket paths have a length cap
    state_dir, run_dir = work / "c", work / "run"
    home_token = Path.home() / ".ray" / "auth_token"  # what a bare `ray.init()` writes
    helper, state = _helper(), {}
    # Another Ray cluster on this host may hold Ray's default ports (6379, 8265, 10001, 52365 and
    # workers' 10002-19999): use ports free right now, and worker ports the OS chooses (0, 0).
    gcs_port, dashboard_port, client_port, agent_port = helper.free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        MLLM_MSR_RAY_DIR=str(state_dir),
        MLLM_MSR_RAY_PORT=str(gcs_port),
        MLLM_MSR_RAY_DASHBOARD_PORT=str(dashboard_port),
        MLLM_MSR_RAY_CLIENT_PORT=str(client_port),
        MLLM_MSR_RAY_AGENT_PORT=str(agent_port),
        MLLM_MSR_RAY_MIN_WORKER_PORT="0",
        MLLM_MSR_RAY_MAX_WORKER_PORT="0",
        MLLM_MSR_RAY_NUM_CPUS="2",
        MLLM_MSR_RAY_OBJECT_STORE_BYTES="500000000",
    )
    try:
        t0 = time.monotonic()
        started = _run(["start"], env, timeout=150)
        start_s = time.monotonic() - t0
        assert started.returncode == 0, started.stdout + started.stderr
        state = _state(state_dir)
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert state["GCS_PORT"] == str(gcs_port)
        assert state["DASHBOARD_URL"] == f"http://127.0.0.1:{dashboard_port}"
        # `start` returns once the job API answers; `ray start` launches the head's raylet
        # after its dashboard, so the raylet may still be on its way (seen under load).
        deadline = time.monotonic() + 60
        while True:
            raylets = [
                cmd
                for name, cmd in map(
                    _name_and_cmdline,
                    helper.cluster_processes(int(state["RAY_PID"]), state["CLUSTER_ID"]),
                )
                if name == "raylet"
            ]
            if raylets or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert raylets and all("--min_worker_port=0" in cmd for cmd in raylets), raylets

        # Token auth: a file only we can read, outside the repository; ~/.ray is left alone.
        token_file = Path(state["TOKEN_FILE"])
        assert REPO not in token_file.parents
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert not home_token.exists() or home_token.read_text().strip() != token
        jobs_url = state["DASHBOARD_URL"] + "/api/jobs/"
        assert state["DASHBOARD_URL"].startswith("http://127.0.0.1:")
        assert _http_status(jobs_url, None) == 401
        assert _http_status(jobs_url, "0" * 64) == 403  # a wrong token is refused too
        assert _http_status(jobs_url, token) == 200

        job_id = f"mllm-msr-test-{uuid.uuid4().hex[:8]}"
        command = ["python", "jobs/pipeline.py", "--config", "configs/demo-cpu.yaml"]
        # The repository's model cache: tiny models and DeepSpeed's compiled op are reused.
        command += [
            f"run_dir={run_dir}",
            f"cache_dir={REPO / '.cache' / 'mllm_msr'}",
            *REDUCED_DEMO,
        ]
        if STAGES is not None:
            command.append(f"stages=[{','.join(STAGES)}]")
        t0 = time.monotonic()
        submitted = _run(["submit", "--submission-id", job_id, "--", *command], env, timeout=600)
        submit_s = time.monotonic() - t0
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert f"Job '{job_id}' succeeded" in submitted.stdout + submitted.stderr

        # Every port of the cluster (GCS, raylet, workers, agents, dashboard, metrics) listens
        # on loopback only.
        pids = {p.pid for p in helper.cluster_processes(int(state["RAY_PID"]), state["CLUSTER_ID"])}
        listening = _listening_addresses(pids)
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening

        # `status` and `logs` through the script, and a tokenless `ray status` straight to the
        # GCS (other local users can reach it), side by side: each is a CLI start-up. The CLI
        # needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 like the script's calls: without it Ray
        # replaces 127.0.0.1 by the host's primary address, where nothing listens.
        ray_cli = str(Path(sys.executable).with_name("ray"))
        tokenless = [ray_cli, "status", "--address", f"127.0.0.1:{state['GCS_PORT']}"]
        tokenless_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(_run, [cmd, job_id], env, 60) for cmd in ("status", "logs")]
            futures.append(
                pool.submit(
                    subprocess.run,
                    tokenless,
                    env=tokenless_env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            )
            status, logs, gcs = (f.result() for f in futures)
        assert gcs.returncode != 0 and "InvalidAuthToken" in gcs.stderr, gcs.stderr[-2000:]
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
        assert logs.returncode == 0, logs.stderr
        request = urllib.request.Request(
            jobs_url + job_id, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["status"] == "SUCCEEDED"
        for stage in STAGES or ["ingest", "prepare", "evaluate"]:
            assert f"[pipeline] {stage}: done" in logs.stdout, logs.stdout[-3000:]
        # --working-dir shipped the repository without the excluded folders.
        pkgs = state_dir.glob("ray/session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
        (shipped,) = [p for p in pkgs if p.is_dir()]
        assert (shipped / "jobs" / "pipeline.py").is_file()
        assert (shipped / "mllm_msr" / "runtime.py").is_file()
        for excluded in (".git", ".venv", ".cache", "runs"):
            assert not (shipped / excluded).exists(), excluded
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert set(summary["stages"]) == set(STAGES or summary["stages"])
        for stage, info in summary["stages"].items():
            assert (run_dir / "_stages" / f"{stage}.json").is_file()
            assert info["rows_in"] == info["rows_out"] + info["quarantined"]
        if STAGES is None:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert {"fine_tuned", "zero_shot", "popularity"} <= set(metrics["methods"]), metrics
            for method, values in metrics["methods"].items():
                assert values["n_users"] == metrics["n_users"] > 0, method
                assert {"auc", "hr@5", "mrr@5", "ndcg@5"} <= set(values), method

        t0 = time.monotonic()
        stopped = _run(["stop"], env, timeout=120)
        stop_s = time.monotonic() - t0
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert helper.cluster_processes(int(state["RAY_PID"]), state["CLUSTER_ID"]) == []
        assert not (state_dir / "cluster.env").exists()
        print(
            f"\ncluster start {start_s:.1f} s, submit -> SUCCEEDED {submit_s:.1f} s, "
            f"stop {stop_s:.1f} s"
        )
    finally:
        if state and helper.cluster_processes(int(state["RAY_PID"]), state["CLUSTER_ID"]):
            helper.stop(int(state["RAY_PID"]), state["CLUSTER_ID"], grace_s=10)
        shutil.rmtree(work, ignore_errors=True)
