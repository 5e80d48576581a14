"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, as Ray's own fault-tolerance
tests build one): the first stages on a 3-node cluster with the run directory on the local S3
server; a local-path run directory on it is refused unless the config says it is shared."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from mllm_msr.runtime import RunDir, RunDirNotShared, check_run_dir_shared

ROOT = Path(__file__).resolve().parents[1]


def test_local_run_dir_refused_on_several_nodes(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    check_run_dir_shared(run, shared=False, nodes=1)
    check_run_dir_shared(run, shared=True, nodes=3)
    with pytest.raises(RunDirNotShared, match=r"3 nodes.*s3://.*run_dir_shared=true"):
        check_run_dir_shared(run, shared=False, nodes=3)


def test_object_store_run_dir_accepted_on_several_nodes(s3_server):
    run = RunDir(f"s3://{s3_server['bucket']}/multi-{uuid.uuid4().hex[:6]}")
    check_run_dir_shared(run, shared=False, nodes=3)


@pytest.fixture
def cluster(s3_server):
    """Head (no CPU: drivers only) + 2 worker nodes with their own custom resources."""
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 150 * 1024 * 1024},
    )
    for i in range(2):
        c.add_node(num_cpus=1, resources={f"worker{i}": 1}, object_store_memory=150 * 1024 * 1024)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if had_ray:  # the session's embedded Ray, as tests/conftest.py starts it
            from conftest import _start_local_ray

            _start_local_ray()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_first_stages_on_three_nodes_with_s3_run_dir(cluster, s3_server, tmp_path):
    import ray

    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline

    stages = "stages=[ingest,prepare,item_summaries]"
    common = [
        f"ray.address={cluster.address}",
        "ingest.demo_users=40",
        "ingest.demo_items=30",
        "item_summaries.enabled=false",
        stages,
    ]
    local = load_config(ROOT / "configs" / "demo-cpu.yaml", [f"run_dir={tmp_path}/r", *common])
    with pytest.raises(RunDirNotShared, match="3 nodes"):
        run_pipeline(local)  # connects to the cluster, then refuses before any stage runs
    assert not RunDir(local.run_dir).stage_done("ingest")

    uri = f"s3://{s3_server['bucket']}/three-nodes-{uuid.uuid4().hex[:6]}"
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", [f"run_dir={uri}", *common])
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    print(f"[multinode] {stages} on 3 nodes, {uri}: {time.perf_counter() - t0:.1f} s")
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert list(summary["stages"]) == ["ingest", "prepare", "item_summaries"]
    run = RunDir(uri)
    items = run.read_table("items", ["item_id"])["item_id"].to_pylist()
    summaries = run.read_table("item_summaries", ["item_id"])["item_id"].to_pylist()
    assert sorted(summaries) == sorted(items)  # one (title) summary per item, exactly once
    users = run.read_table("sequences", ["user_id"])["user_id"].to_pylist()
    assert users and len(users) == len(set(users))
    again = run_pipeline(cfg)
    assert all(s["skipped"] for s in again["stages"].values())
