"""Autoscaling, exercised: Ray's fake multi-node provider (``provider: type: fake_multinode``,
how Ray tests its autoscaler on one machine) starts a worker node from 0 when a stage asks for
a resource that no running node has, and removes it once it idles.

``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force`` (every Ray process of the
host, other people's included) and reads ``fake_multi_node/example.yaml``, which Ray's wheel
does not ship, so the test starts the head itself, as ``AutoscalingCluster.start`` does:
``RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=…`` with free ports, token
authentication and its own temp dir, and stops exactly that process tree
(``scripts/_local_cluster.py``'s ``stop``; the fake worker nodes are processes of the head's
autoscaler and carry its marker). The provider settings are those of Ray's ``example.yaml``:
``use_node_id_as_ip`` (every fake node has the host's IP; without it autoscaler v1 maps all
nodes to one and marks each new one "launch failed"), ``disable_node_updaters`` and
``disable_launch_config_check``. The driver runs in a subprocess whose environment carries the
cluster's token (Ray reads its authentication settings once per process)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.1  # 6 s
RESOURCE = "summarizer"  # offered by the worker type only, asked for by the item summarizers


def _helper():
    spec = importlib.util.spec_from_file_location(
        "_local_cluster", ROOT / "scripts" / "_local_cluster.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def autoscaling_config(gcs_address: str) -> dict:
    """A fake-multinode cluster: a head with CPUs (ingest and Ray Data's own tasks run there)
    and one worker type, from 0, that alone offers the ``summarizer`` resource."""
    return {
        "cluster_name": "mllm-msr-fake",
        "max_workers": 1,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # the provider's default is the host's port 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            f"{RESOURCE}_node": {
                "resources": {"CPU": 1, RESOURCE: 1, "object_store_memory": 150 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def fake_autoscaling_cluster(s3_server):
    """Yields (GCS address, environment for a driver of this cluster, state dir)."""
    helper = _helper()
    state = Path(tempfile.mkdtemp(prefix="mmsr-as-"))  # short: Ray's socket paths
    token = state / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port, dash = helper.free_ports(2)
    gcs = f"127.0.0.1:{port}"
    config = state / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    cluster_id = uuid.uuid4().hex
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # loopback only, as scripts/local_cluster.sh: Ray's single-node mode keeps a loopback
        # node IP (the fake worker nodes inherit it from the head's autoscaler)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    for key in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(key, None)
    head_env = {
        **env,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        helper.MARKER_VAR: cluster_id,
    }
    log = open(state / "head.log", "w")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--dashboard-port={dash}",
            f"--temp-dir={state}",
            f"--autoscaling-config={config}",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
        ],
        env=head_env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield gcs, env, state
    finally:
        helper.stop(head.pid, cluster_id, grace_s=10)
        log.close()
        left = helper.cluster_processes(head.pid, cluster_id)
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


def _worker_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(RESOURCE)]


def drive(address: str, uri: str) -> None:
    """The driver (a subprocess): ingest, then item summaries on a node that does not exist
    yet; time the node's arrival and removal; print one JSON line."""
    import threading

    import ray

    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline
    from mllm_msr.runtime import init_ray

    overrides = [
        f"run_dir={uri}",
        f"ray.address={address}",
        "ingest.demo_users=30",
        "ingest.demo_items=24",
        "item_summaries.sampling.max_new_tokens=8",
        f"item_summaries.pool.resources.{RESOURCE}=1",
    ]
    base = ROOT / "configs" / "demo-cpu.yaml"
    cfg = load_config(base, [*overrides, "stages=[ingest]"])
    init_ray(cfg.ray.address, hf_hub_offline=cfg.hf_hub_offline)  # as run_pipeline does
    before = _worker_nodes()
    run_pipeline(cfg)
    seen: dict[str, object] = {}

    def watch() -> None:
        while "up" not in seen:
            nodes = _worker_nodes()
            if nodes:
                up = time.perf_counter()
                seen["ips"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
                seen["nodes"], seen["up"] = nodes, up
            time.sleep(0.2)

    cfg = load_config(base, [*overrides, "stages=[item_summaries]"])
    t0 = time.perf_counter()  # the stage's actors ask for the resource from here on
    threading.Thread(target=watch, daemon=True).start()
    run_pipeline(cfg)
    t_done = time.perf_counter()
    deadline = t_done + 180
    while _worker_nodes() and time.perf_counter() < deadline:
        time.sleep(0.2)
    after = _worker_nodes()
    out = {
        "before": before,
        "during": seen.get("nodes", []),
        "ips": seen.get("ips", []),
        "after": after,
        "up_s": seen["up"] - t0 if "up" in seen else None,
        "stage_s": t_done - t0,
        "down_s": None if after else time.perf_counter() - t_done,
    }
    print("AUTOSCALING " + json.dumps(out), flush=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fake_autoscaler_starts_a_node_from_zero_and_removes_it_when_idle(
    fake_autoscaling_cluster, s3_server
):
    from mllm_msr.runtime import RunDir

    gcs, env, state = fake_autoscaling_cluster
    uri = f"s3://{s3_server['bucket']}/autoscaled-{uuid.uuid4().hex[:6]}"
    before = _uptime()
    proc = subprocess.run(
        [sys.executable, "-c", f"import test_autoscaling as t; t.drive({gcs!r}, {uri!r})"],
        env=env,
        capture_output=True,
        text=True,
        timeout=350,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("AUTOSCALING ")]
    head_log = (state / "head.log").read_text()[-2000:]
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-4000:] + head_log
    t = json.loads(line[-1].split(" ", 1)[1])
    print(
        f"[autoscaling] scale-up {t['up_s']:.1f} s (stage start -> node alive); stage "
        f"{t['stage_s']:.1f} s; scale-down {t['down_s']:.1f} s (stage end -> node removed, idle "
        f"timeout {IDLE_TIMEOUT_MIN * 60:.0f} s); load before: {before}; after: {_uptime()}"
    )
    # 0 -> >= 1 -> 0 worker nodes, and the summarizers ran on the node that was started
    assert t["before"] == [] and t["during"] and t["after"] == []
    assert t["up_s"] is not None and t["down_s"] is not None
    assert t["ips"] == ["127.0.0.1"]  # head and fake node listen on the loopback address only
    run = RunDir(uri)
    assert run.stage_summary("item_summaries")["nodes"] == t["during"]
    summaries = run.read_table("item_summaries", ["item_id"])["item_id"].to_pylist()
    items = run.read_table("items", ["item_id"])["item_id"].to_pylist()
    assert len(summaries) == len(set(summaries)) and sorted(summaries) == sorted(items)
