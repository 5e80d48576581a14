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
    from conftest import ray_cluster

    workers = [{"num_cpus": 1, "resources": {f"worker{i}": 1}} for i in range(2)]
    with ray_cluster(0, workers) as (c, _):
        yield c


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


PLACEMENT = [
    "item_summaries.pool.resources.summarizer=1",
    "user_preferences.pool.resources.preferences=1",
    "train.resources_per_worker.trainer=1",
]


@pytest.fixture
def placement_cluster(s3_server):
    """Head (no CPU) + 3 worker nodes, each offering one custom resource: the summarizer
    actors, the preference actors and the train workers can each run on one node only."""
    from conftest import ray_cluster

    kinds = [
        ("summarizer", 2, {"summarizer": 1}),
        ("preferences", 2, {"preferences": 1}),
        ("trainer", 3, {"trainer": 2}),
    ]
    workers = [{"num_cpus": cpus, "resources": res} for _, cpus, res in kinds]
    with ray_cluster(0, workers) as (c, nodes):
        yield c, {name: node for (name, _, _), node in zip(kinds, nodes)}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reduced_pipeline_placed_by_custom_resources(placement_cluster, s3_server, tmp_path):
    """The reduced pipeline on 4 nodes with the S3 run directory; custom resources put the
    summarizer actors, the preference actors and the train workers each on their own node,
    and each stage's summary names the nodes its actors ran on."""
    import subprocess

    from reduced_demo import REDUCED_DEMO, check_counts_add_up

    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline

    cluster, nodes = placement_cluster
    ids = {name: n.node_id for name, n in nodes.items()}
    uri = f"s3://{s3_server['bucket']}/placed-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        ROOT / "configs" / "demo-cpu.yaml",
        [f"run_dir={uri}", f"ray.address={cluster.address}", *REDUCED_DEMO, *PLACEMENT],
    )
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    wall = time.perf_counter() - t0
    print(f"[multinode] reduced pipeline, 4 nodes, {uri}: {wall:.1f} s (before: {load})")
    assert not any(s["skipped"] for s in summary["stages"].values())
    run = RunDir(uri)
    placed = {s: run.stage_summary(s)["nodes"] for s in ("item_summaries", "user_preferences")}
    train_nodes = run.stage_summary("train")["nodes"]  # per attempt, per rank
    print(f"[multinode] nodes {ids}; item/user actors ran on {placed}; train on {train_nodes}")
    assert placed == {
        "item_summaries": [ids["summarizer"]],
        "user_preferences": [ids["preferences"]],
    }
    assert train_nodes == [[ids["trainer"]] * cfg.train.num_workers]
    check_counts_add_up(run)
