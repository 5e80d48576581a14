"""The run directory on object storage: a real S3 API (moto's server on 127.0.0.1), no mocks.

Fast tests: :class:`RunDir` writes, reads, manifests and the lease on ``s3://``; no temporary
object is left and no partial part is ever visible. Slow test: the reduced demo pipeline end to
end with ``run_dir=s3://<bucket>/<run>`` (every stage's tables, quarantine, completion records,
Ray Train checkpoints, the adapter, ``metrics.json``), then a rerun that skips every stage.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from reduced_demo import REDUCED_DEMO, check_counts_add_up

from mllm_msr.runtime import RunDir, local_copy

ROOT = Path(__file__).resolve().parents[1]


def _s3_run(s3_server, name: str | None = None) -> RunDir:
    return RunDir(f"s3://{s3_server['bucket']}/{name or uuid.uuid4().hex[:8]}")


def _objects(run: RunDir) -> list[str]:
    sel = pafs.FileSelector(run.root, recursive=True)
    return sorted(i.path for i in run.fs.get_file_info(sel) if i.type == pafs.FileType.File)


def test_run_dir_on_s3_writes_reads_and_verifies(s3_server):
    run = _s3_run(s3_server)
    assert not run.local and isinstance(run.fs, pafs.S3FileSystem)
    table = pa.table({"item_id": ["a", "b", "c"], "n": [1, 2, 3]})
    run.write_table("items", table, "part-0")
    run.write_table("items", table.slice(0, 1), "part-1")
    run.write_json("_stages/ingest.json", {"x": 1})
    assert run.read_table("items").num_rows == 4
    assert run.read_json("_stages/ingest.json") == {"x": 1}
    assert run.stage_done("ingest") and run.exists("items", "part-0.parquet")
    # Written straight to the final key: no temporary object is ever created.
    assert not [p for p in _objects(run) if ".tmp" in p]

    manifest = run.manifest(["items"])
    assert set(manifest) == {"items/part-0.parquet", "items/part-1.parquet"}
    assert manifest["items/part-0.parquet"]["rows"] == 3
    assert run.verify_manifest(manifest) == []
    run.write_table("items", table.slice(0, 2), "part-0")  # changed behind the record
    assert [p for p, _ in run.verify_manifest(manifest)] == ["items/part-0.parquet"]

    with run.fs.open_output_stream(run.path("items", "part-2.parquet")) as fh:
        fh.write(b"PAR1 cut short")  # what a non-atomic writer would leave
    assert run.drop_unreadable("items", log=lambda *_: None) == [
        run.path("items", "part-2.parquet")
    ]
    run.remove("items")
    assert not run.exists("items") and run.table_files("items") == []


def test_part_is_invisible_until_its_upload_completes(s3_server):
    """An S3 object appears only when its upload completes: a writer killed before that leaves
    nothing under the final name (what makes direct writes to the final key safe)."""
    run = _s3_run(s3_server)
    run.makedirs("t")
    stream = run.fs.open_output_stream(run.path("t", "part.parquet"))
    stream.write(b"x" * (6 << 20))  # more than one multipart chunk (5 MiB) already uploaded
    assert not run.exists("t", "part.parquet")
    stream.close()
    assert run.exists("t", "part.parquet")


def test_lease_on_s3(s3_server):
    from mllm_msr.lease import LeaseHeld, RunLease

    run = _s3_run(s3_server)
    with RunLease(run, settle_s=0.1, log=lambda *_: None) as lease:
        assert run.read_json("_lease.json")["token"] == lease.token
        with pytest.raises(LeaseHeld, match="is in use by"):
            RunLease(RunDir(run.uri), settle_s=0.1, log=lambda *_: None).acquire()
    assert not run.exists("_lease.json")
    assert not [p for p in _objects(run) if ".tmp" in p]


def test_local_copy_of_an_s3_folder(s3_server):
    run = _s3_run(s3_server)
    run.write_json("adapter/adapter_config.json", {"r": 4})
    with local_copy(run.uri_of("adapter")) as local:
        assert json.loads((Path(local) / "adapter_config.json").read_text()) == {"r": 4}
    assert not Path(local).exists()
    with local_copy("/some/local/path") as same:
        assert same == "/some/local/path"


REDUCED = [*REDUCED_DEMO, "evaluate.baselines=[popularity,zero_shot,random]"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_pipeline_on_s3_end_to_end_then_skips(s3_server, ray_s3):
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import run_pipeline

    uri = f"s3://{s3_server['bucket']}/demo-{uuid.uuid4().hex[:8]}"
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", [f"run_dir={uri}", *REDUCED])
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    print(f"[s3] reduced demo pipeline on {uri}: {time.perf_counter() - t0:.1f} s")
    stages = summary["stages"]
    assert list(stages) == [
        "ingest",
        "prepare",
        "item_summaries",
        "user_preferences",
        "train",
        "evaluate",
    ]
    assert not any(s["skipped"] for s in stages.values())
    run = RunDir(uri)
    assert run.read_json("run_summary.json")["stages"].keys() == stages.keys()

    # Every output is on the object store: tables, records with their parts, checkpoints.
    for stage in stages:
        record = run.stage_record(stage)
        assert record and record["fingerprint"], stage
        for part, described in record["parts"].items():
            assert run.describe_file(part) == described, part
    sequences = check_counts_add_up(run)  # nothing lost between stages
    assert run.files_under("train/recommender"), "Ray Train checkpoints on S3"
    assert run.stage_summary("train")["steps"] == 4
    assert run.exists("adapter", "adapter_config.json")

    metrics = run.read_json("metrics.json")
    n_test = sequences["split"].to_pylist().count("test")
    assert metrics["n_users"] == n_test and metrics["n_candidates"] == 21 * n_test
    assert set(metrics["methods"]) == {"fine_tuned", "zero_shot", "popularity", "random"}
    for method, m in metrics["methods"].items():
        assert m["n_users"] == n_test, method
        assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["hr@1"] <= m["hr@5"] <= m["hr@10"] <= 1.0
    assert not [p for p in _objects(run) if p.endswith(".tmp")]

    again = run_pipeline(cfg)
    assert all(s["skipped"] for s in again["stages"].values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_on_s3_resumes_from_its_s3_checkpoint_after_a_dead_worker(s3_server, ray_s3):
    """Ray Train's checkpoints live on S3 (``storage_filesystem``): a worker that dies at step 6
    restarts the run from the step-4 checkpoint read back from the bucket."""
    from test_train import _toy_run, _train_cfg

    from mllm_msr.stages.train import run_train

    uri = f"s3://{s3_server['bucket']}/train-{uuid.uuid4().hex[:8]}"
    run = _toy_run(uri)
    cfg = _train_cfg(uri, "train.zero.stage=2", "train.max_steps=8")
    summary = run_train(cfg, run, fail_once_at_step=6)
    assert summary["steps"] == 8 and summary["attempts"] == 2
    assert summary["resumed_from_steps"] == [4]
    assert [s for s, _ in summary["losses"]] == list(range(1, 9))
    assert run.exists("train", "_injected_failure")  # the fault flag, on S3 too
    assert summary["checkpoint"].startswith(run.path("train", "recommender"))
    assert run.exists("adapter", "adapter_config.json")
    assert run.exists("adapter", "adapter_model.safetensors")
