"""Weights on every node, with a real extra Ray node: a worker node that starts with an empty
model cache of its own (``MLLM_MSR_NODE_CACHE`` in its raylet's environment, as a node image
would set it) loads the item summarizer's model from the S3 server (moto on 127.0.0.1): the
model is synced into that node's cache once, checked against its manifest, and the stage's
output is complete. The driver's node downloads nothing."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from mllm_msr.model_source import NODE_CACHE_ENV, downloads, local_dir, publish_models
from mllm_msr.runtime import RunDir, node_cache_dir
from mllm_msr.tiny import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def fresh_node(s3_server, tmp_path):
    """Head (no CPU: the driver only) + 1 worker node whose raylet has its own empty cache."""
    from conftest import ray_cluster

    cache = tmp_path / "fresh-node-cache"
    worker = {"num_cpus": 3, "resources": {"fresh": 2}, "env_vars": {NODE_CACHE_ENV: str(cache)}}
    with ray_cluster(0, [worker]) as (c, (node,)):
        yield c, node, cache


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_empty_cache_node_syncs_the_model_from_s3_once(fresh_node, s3_server):
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline

    cluster, node, cache = fresh_node
    uri = f"s3://{s3_server['bucket']}/models/{uuid.uuid4().hex[:8]}/qwen2-vl"
    manifest = publish_models(resolve_model("tiny:qwen2-vl"), uri)

    def config(run: str):
        return load_config(
            ROOT / "configs" / "demo-cpu.yaml",
            [
                f"run_dir=s3://{s3_server['bucket']}/{run}",
                f"ray.address={cluster.address}",
                f"item_summaries.engine.model={uri}",
                "item_summaries.pool.resources.fresh=1",  # only the fresh node offers it
                "item_summaries.pool.concurrency=2",  # two actors of one node ask at once
                "item_summaries.pool.batch_size=4",
                "item_summaries.sampling.max_new_tokens=4",
                "ingest.demo_users=12",
                "ingest.demo_items=8",
                "stages=[ingest,item_summaries]",
            ],
        )

    load = _uptime()
    t0 = time.perf_counter()
    first = config(f"fresh-node-{uuid.uuid4().hex[:6]}")
    run_pipeline(first)
    print(f"[node-models] first run (sync + 2 engines): {time.perf_counter() - t0:.1f} s ({load})")

    run = RunDir(first.run_dir)
    assert run.stage_summary("item_summaries")["nodes"] == [node.node_id]
    items = run.read_table("items", ["item_id"])["item_id"].to_pylist()
    done = run.read_table("item_summaries", ["item_id", "model"])
    assert sorted(done["item_id"].to_pylist()) == sorted(items) and len(items) == 8
    (model,) = set(done["model"].to_pylist())
    assert model.startswith(f"{uri}@")  # the published model, tagged with its weights' digest

    dest = local_dir(uri, cache)
    assert json.loads((dest / ".synced.json").read_text()) == manifest  # verified copy
    assert (dest.parent / f"{dest.name}.lock").exists()  # the node-local lock
    records = downloads(uri, cache)
    assert len(records) == 1, records  # two actors, one download
    assert records[0]["files"] == len(manifest["files"])
    assert records[0]["bytes"] == sum(f["size"] for f in manifest["files"].values())
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no partial copy
    assert not local_dir(uri, node_cache_dir(first.cache_dir)).exists()  # driver: no copy
    synced = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    load = _uptime()
    t0 = time.perf_counter()
    second = config(f"fresh-node-{uuid.uuid4().hex[:6]}")
    run_pipeline(second)
    print(f"[node-models] second run (cache hit): {time.perf_counter() - t0:.1f} s ({load})")
    assert RunDir(second.run_dir).read_table("item_summaries").num_rows == 8
    assert len(downloads(uri, cache)) == 1  # no second download
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == synced
