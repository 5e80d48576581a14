"""A pipeline driver killed mid-stage with the run directory on S3 (the moto server on
127.0.0.1), then rerun, gives the same tables as an uninterrupted run on S3.

The driver runs as its own process (``python -m mllm_msr pipeline``) against a Ray cluster that
the test starts (``ray.cluster_utils.Cluster``), so that killing the driver (SIGKILL: no cleanup
of any kind) ends its job and actors while the cluster survives for the rerun. The summarizer
pauses after its first batch (``MLLM_MSR_HOLD_ITEM_SUMMARIES_S``): the kill lands when some
parts are on S3 and others are not. Every part visible after the kill must read as a whole
Parquet file (an S3 object appears only when its upload completes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mllm_msr.runtime import RunDir

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "ingest.demo_users=16",
    "ingest.demo_items=24",
    "item_summaries.pool.batch_size=4",
    "item_summaries.sampling.max_new_tokens=6",
    "stages=[ingest,item_summaries]",
]
COLUMNS = ["item_id", "summary", "model", "prompt_version"]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def cluster(s3_server):
    """One Ray node (2 CPUs) that outlives the drivers the test starts and kills."""
    from conftest import ray_cluster

    with ray_cluster(2, [], head_object_store=300 * 2**20) as (c, _):
        yield c


def _driver(address: str, uri: str, hold_s: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLLM_MSR_HOLD_ITEM_SUMMARIES_S"}
    env["PYTHONPATH"] = str(ROOT)
    if hold_s:
        env["MLLM_MSR_HOLD_ITEM_SUMMARIES_S"] = str(hold_s)
    cmd = [sys.executable, "-m", "mllm_msr", "pipeline", "--config", "configs/demo-cpu.yaml"]
    cmd += [f"run_dir={uri}", f"ray.address={address}", *SETTINGS]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _table(run: RunDir) -> list[tuple]:
    t = run.read_table("item_summaries", COLUMNS)
    return sorted(zip(*(t[c].to_pylist() for c in COLUMNS)))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_driver_killed_mid_stage_on_s3_then_rerun_gives_the_same_tables(cluster, s3_server):
    prefix = f"s3://{s3_server['bucket']}/driver-kill-{uuid.uuid4().hex[:6]}"
    ref, run = RunDir(f"{prefix}/uninterrupted"), RunDir(f"{prefix}/killed")

    load = _uptime()
    t0 = time.perf_counter()
    _finish(_driver(cluster.address, ref.uri))
    print(f"[driver-kill] uninterrupted run: {time.perf_counter() - t0:.1f} s ({load})")
    want = _table(ref)
    n_items = ref.read_table("items", ["item_id"]).num_rows
    assert len(want) == len({r[0] for r in want}) == n_items == 24

    driver = _driver(cluster.address, run.uri, hold_s=300)
    try:
        deadline = time.monotonic() + 600
        while not (run.exists("_faults/item_summaries-hold") and run.table_files("item_summaries")):
            assert driver.poll() is None, driver.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the summarizer wrote no part"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: the cluster stays
        driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == -signal.SIGKILL

    # What the killed driver left: whole parts only, the stage not recorded as done.
    parts = run.table_files("item_summaries")
    at_kill = sum(pq.read_metadata(p, filesystem=run.fs).num_rows for p in parts)
    print(f"[driver-kill] killed with {len(parts)} parts, {at_kill} of {n_items} rows on S3")
    assert 0 < at_kill < n_items
    assert not run.stage_done("item_summaries") and run.stage_done("ingest")
    for p in parts:
        assert pq.read_table(p, filesystem=run.fs).num_rows > 0, p

    load = _uptime()
    t0 = time.perf_counter()
    out = _finish(_driver(cluster.address, run.uri))  # takes over the dead driver's lease
    assert "is gone" in out and f"{at_kill} already done" in out  # resumed, not redone
    print(f"[driver-kill] rerun after the kill: {time.perf_counter() - t0:.1f} s ({load})")
    got = _table(run)
    assert len({r[0] for r in got}) == len(got) == n_items  # every item exactly once
    assert got == want  # the same summaries as the uninterrupted run
    assert run.stage_done("item_summaries")
    items = run.read_table("items", ["item_id", "title"])
    assert sorted(zip(*items.to_pydict().values())) == sorted(
        zip(*ref.read_table("items", ["item_id", "title"]).to_pydict().values())
    )
    sel = run.fs.get_file_info(pafs.FileSelector(run.root, recursive=True))
    assert not [i.path for i in sel if i.path.endswith(".tmp")]
