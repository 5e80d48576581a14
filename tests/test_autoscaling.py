"""Autoscaling, exercised: Ray's fake multi-node provider (``provider: type: fake_multinode``,
how Ray tests its autoscaler on one machine) starts a worker node from 0 when a stage asks for
a resource that no running node has, and removes it once it idles.

``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force`` (every Ray process of the
host, other people's included) and reads ``fake_multi_node/example.yaml``, which Ray's wheel
does not ship. The test therefore starts the cluster the documented way,
``MLLM_MSR_RAY_AUTOSCALING_CONFIG=cluster/fake-autoscaling.yaml scripts/local_cluster.sh start``
(its own state and temp dir, free ports, token authentication, loopback addresses), and stops it
with ``scripts/local_cluster.sh stop``, which stops exactly that cluster: the fake worker nodes
are processes of the head's autoscaler and carry the cluster's marker. The driver runs in a
subprocess whose environment carries the cluster's token (Ray reads its authentication settings
once per process). Autoscaler v1: v2's monitor needs the missing ``example.yaml`` too
(``fillout_defaults``) and exits at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import file_module
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_cluster.sh"
CONFIG = ROOT / "cluster" / "fake-autoscaling.yaml"
RESOURCE = "summarizer"  # offered by the worker type only, asked for by the item summarizers


def _helper():
    return file_module.load("_local_cluster", ROOT / "scripts" / "_local_cluster.py")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def test_shipped_fake_autoscaling_config_scales_the_summarizer_from_zero(tmp_path):
    """The config the README and the slow test use: one worker type, from 0, that alone
    offers the resource; a short idle timeout; the settings Ray's fake provider needs."""
    config = yaml.safe_load(CONFIG.read_text())
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["use_node_id_as_ip"] is True
    workers = {k: v for k, v in config["available_node_types"].items() if k != "ray.head.default"}
    offering = [v for v in workers.values() if v["resources"].get(RESOURCE)]
    assert len(offering) == 1 and offering[0]["min_workers"] == 0
    assert 0 < config["idle_timeout_minutes"] <= 0.5
    # local_cluster.sh's copy names the head's GCS address; other providers are refused
    helper, out = _helper(), tmp_path / "autoscaling.json"
    helper.autoscaling_config(str(CONFIG), str(out), "127.0.0.1:4321")
    assert json.loads(out.read_text())["provider"]["gcs_address"] == "127.0.0.1:4321"
    assert out.stat().st_mode & 0o077 == 0
    aws = ROOT / "cluster" / "aws-gpu.yaml"
    with pytest.raises(SystemExit, match="MLLM_MSR_RAY_AUTOSCALING_CONFIG.*fake_multinode"):
        helper.autoscaling_config(str(aws), str(tmp_path / "no.json"), "127.0.0.1:4321")


@pytest.fixture
def fake_autoscaling_cluster(s3_server):
    """Yields (GCS address, environment for a driver of this cluster, state dir)."""
    state = Path(tempfile.mkdtemp(prefix="mmsr-as-"))  # short: Ray's socket paths; mode 700
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        MLLM_MSR_RAY_DIR=str(state),
        MLLM_MSR_RAY_FREE_PORTS="1",
        MLLM_MSR_RAY_NUM_CPUS="2",  # ingest and Ray Data's own tasks run on the head
        MLLM_MSR_RAY_OBJECT_STORE_BYTES="150000000",
        MLLM_MSR_RAY_AUTOSCALING_CONFIG=str(CONFIG),
    )
    run = {"env": env, "cwd": ROOT, "capture_output": True, "text": True}
    try:
        started = subprocess.run([str(SCRIPT), "start"], timeout=180, **run)
        assert started.returncode == 0, started.stdout + started.stderr
        lines = (state / "cluster.env").read_text().splitlines()
        cluster = dict(line.split("=", 1) for line in lines if "=" in line)
        driver_env = {
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": cluster["TOKEN_FILE"],
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # 127.0.0.1 stays the node IP
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        }
        yield f"127.0.0.1:{cluster['GCS_PORT']}", driver_env, state
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], timeout=120, **run)
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


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
@pytest.mark.timeout(600)  # 78-142 s here at load 7-62
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
        timeout=500,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("AUTOSCALING ")]
    head_log = (state / "ray-start.log").read_text()[-2000:]
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-4000:] + head_log
    t = json.loads(line[-1].split(" ", 1)[1])
    idle_s = yaml.safe_load(CONFIG.read_text())["idle_timeout_minutes"] * 60
    print(
        f"[autoscaling] scale-up {t['up_s']:.1f} s (stage start -> node alive); stage "
        f"{t['stage_s']:.1f} s; scale-down {t['down_s']:.1f} s (stage end -> node removed, idle "
        f"timeout {idle_s:.0f} s); load before: {before}; after: {_uptime()}"
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
