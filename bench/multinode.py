"""Benchmark: the reduced demo pipeline on a 4-node Ray cluster with the run directory on S3,
against one node with a local run directory, on the same machine in one sitting.

* ``cluster``: ``ray.cluster_utils.Cluster`` with a head (no CPU) and three worker nodes (2, 2
  and 3 CPUs), each offering one custom resource, so that the summarizer actors, the preference
  actors and the train workers each run on their own node (as in
  ``tests/test_multinode.py``); the run directory on a local S3 server (moto's
  ``ThreadedMotoServer`` in a child process, reached through the standard ``AWS_*`` variables);
* ``one node``: an embedded Ray with the same 7 logical CPUs and a local run directory.

Both run the demo config with the reduced overrides of the tests (80 users, 60 items, 8 new
tokens, 4 train steps). Each run starts fresh; the order alternates with ``--repeat``. Prints
and records (``bench/results/multinode/``) the wall times and the ratio one node / cluster
(above 1: the cluster is faster). On 2 cores all nodes share the same two cores, so the ratio
measures the cost of the cluster's plumbing (several raylets, object transfer, S3), not a
speed-up.

    .venv/bin/python bench/multinode.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' reduced demo and local S3 server

from reduced_demo import REDUCED_DEMO as REDUCED  # noqa: E402
from s3_local import aws_env, start_server, stop_server  # noqa: E402

from mllm_msr.bench_record import BenchRecord, add_arguments  # noqa: E402

PLACEMENT = [
    "item_summaries.pool.resources.summarizer=1",
    "user_preferences.pool.resources.preferences=1",
    "train.resources_per_worker.trainer=1",
]
WORKERS = [(2, {"summarizer": 1}), (2, {"preferences": 1}), (3, {"trainer": 2})]


def start_s3() -> tuple[subprocess.Popen, str]:
    """A local S3 server (``tests/s3_local.py``), this process's ``AWS_*`` variables pointing
    at it, and a bucket."""
    import boto3

    server, endpoint = start_server()
    os.environ.update(aws_env(endpoint))
    bucket = "mmsr-bench"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return server, bucket


def run_cluster(bucket: str) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 150 * 2**20},
    )
    for cpus, resources in WORKERS:
        cluster.add_node(num_cpus=cpus, resources=resources, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    uri = f"s3://{bucket}/bench-{uuid.uuid4().hex[:6]}"
    try:
        out = _timed_pipeline([f"run_dir={uri}", f"ray.address={cluster.address}", *PLACEMENT])
    finally:
        cluster.shutdown()
    return {"nodes": 1 + len(WORKERS), "run_dir": uri, **out}


def run_one_node(tmp: Path) -> dict:
    cpus = sum(c for c, _ in WORKERS)
    run_dir = tmp / f"one-{uuid.uuid4().hex[:6]}"
    return {
        "nodes": 1,
        "run_dir": "local",
        **_timed_pipeline([f"run_dir={run_dir}", f"ray.num_cpus={cpus}"]),
    }


def _timed_pipeline(overrides: list[str]) -> dict:
    """The reduced demo pipeline with ``overrides``: its wall time, each stage's seconds and the
    load average just before it started."""
    import ray

    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline

    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", [*overrides, *REDUCED])
    load = round(os.getloadavg()[0], 2)
    try:
        t0 = time.perf_counter()
        summary = run_pipeline(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "seconds": round(wall, 1),
        "stage_seconds": {name: st.get("seconds") for name, st in summary["stages"].items()},
        "load_before_run": load,
    }


def main(args: argparse.Namespace) -> dict:
    from mllm_msr.runtime import cpu_env_defaults

    for key, value in cpu_env_defaults().items():  # one CPU-only host (see runtime)
        os.environ.setdefault(key, value)
    record = BenchRecord.start("multinode")
    server, bucket = start_s3()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="mmsr-bench-") as tmp:
            for i in range(args.repeat):
                order = ("one", "cluster") if i % 2 == 0 else ("cluster", "one")
                for what in order:
                    out = run_one_node(Path(tmp)) if what == "one" else run_cluster(bucket)
                    print(json.dumps(out), flush=True)
                    runs.append(out)
    finally:
        stop_server(server)
    one = min(r["seconds"] for r in runs if r["nodes"] == 1)
    many = min(r["seconds"] for r in runs if r["nodes"] > 1)
    ratios = record.gate_ratios({"one_node_over_cluster": round(one / many, 3)}, args.allow_load)
    report = {
        "command": "bench/multinode.py " + " ".join(sys.argv[1:]),
        "overrides": REDUCED,
        "runs": runs,
        "ratios": ratios,
    }
    if not args.no_record:
        print("record:", record.write(report), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "notes": record.notes}), flush=True)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (order alternates)")
    add_arguments(parser)
    main(parser.parse_args())
