"""The stage contract: fingerprints, the plan (what reruns and why), part manifests, the lease.

Fast tests: no Ray, no engine. The scenarios on real stages are in tests/test_trustworthy_runs.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from mllm_msr.config import load_config
from mllm_msr.contract import STAGES, downstream, explain, fingerprint, stage_config
from mllm_msr.lease import LEASE_FILE, LeaseHeld, RunLease
from mllm_msr.pipeline import plan, stale_outside
from mllm_msr.runtime import RunDir


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])


def _complete(cfg, run, stages=None):
    """Write completion records as the pipeline would after running ``stages``."""
    for step in plan(cfg, run):
        if stages is None or step.stage in stages:
            run.write_stage_record(
                step.stage, {**step.fingerprint.record(), "parts": {}, "summary": {"rows_in": 1}}
            )


def test_fingerprint_covers_what_shapes_the_output_and_ignores_speed_settings(tmp_path):
    base = _cfg(tmp_path)
    fp = fingerprint(base, "train", {}).value
    assert fingerprint(_cfg(tmp_path, "train.learning_rate=0.5"), "train", {}).value != fp
    assert fingerprint(_cfg(tmp_path, "train.epochs=2"), "train", {}).value != fp
    assert fingerprint(base, "train", {"prepare": "x"}).value != fp  # an input changed
    # parallelism and logging do not shape the output
    assert fingerprint(_cfg(tmp_path, "train.log_every=3"), "train", {}).value == fp
    placed = _cfg(tmp_path, "train.resources_per_worker.trainer=1")  # placement only
    assert fingerprint(placed, "train", {}).value == fp
    it = fingerprint(base, "item_summaries", {}).value
    cfg = _cfg(
        tmp_path,
        "item_summaries.pool.concurrency=4",
        "item_summaries.pool.batch_size=7",
        "item_summaries.pool.resources.summarizer=1",
    )
    assert fingerprint(cfg, "item_summaries", {}).value == it
    assert "prepare.num_blocks" not in stage_config(base, "prepare")
    assert stage_config(base, "prepare")["prepare.seed"] == 42
    # evaluate depends on the recommender settings it scores with
    assert fingerprint(_cfg(tmp_path, "train.max_length=256"), "evaluate", {}).value != (
        fingerprint(base, "evaluate", {}).value
    )


def test_prompt_version_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    from mllm_msr import prompts

    cfg = _cfg(tmp_path)
    before = fingerprint(cfg, "user_preferences", {})
    monkeypatch.setitem(prompts.PROMPT_VERSIONS, "preference_recurrent", "preference_recurrent/v9")
    after = fingerprint(cfg, "user_preferences", {})
    assert after.value != before.value
    assert explain(before.record(), after) == [
        "prompt preference_recurrent: preference_recurrent/v1 -> preference_recurrent/v9"
    ]
    assert fingerprint(cfg, "ingest", {}).value == fingerprint(cfg, "ingest", {}).value


def test_downstream_follows_the_inputs():
    assert downstream("prepare") == ["prepare", "user_preferences", "train", "evaluate"]
    assert downstream("item_summaries") == [
        "item_summaries",
        "user_preferences",
        "train",
        "evaluate",
    ]
    assert downstream("evaluate") == ["evaluate"]
    assert all(set(STAGES[s].inputs) < set(STAGES) for s in STAGES)


def test_plan_reruns_a_changed_stage_and_everything_after_it_saying_why(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    assert [s.reasons for s in plan(cfg, run)] == [["not run yet"]] * 6
    _complete(cfg, run)
    assert not any(s.run for s in plan(cfg, run))

    changed = _cfg(tmp_path, "prepare.seed=7", "train.learning_rate=0.5")
    steps = {s.stage: s for s in plan(changed, run)}
    assert not steps["ingest"].run and not steps["item_summaries"].run
    assert steps["prepare"].reasons == ["prepare.seed: 42 -> 7"]
    assert steps["user_preferences"].reasons == ["input prepare changed"]
    assert steps["train"].reasons == [
        "train.learning_rate: 2e-05 -> 0.5",
        "input prepare changed",
        "input user_preferences changed",
    ]
    assert steps["evaluate"].run and not any(s.fresh for s in steps.values())

    forced = {s.stage: s for s in plan(cfg, run, force=["train"])}
    assert [s for s, p in forced.items() if p.run] == ["train", "evaluate"]
    assert forced["train"].fresh and forced["evaluate"].fresh
    assert forced["train"].reasons == ["forced"]
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        plan(cfg, run, force=["trian"])


def test_a_record_without_fingerprint_reruns(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    run.write_json("_stages/ingest.json", {"rows_in": 3})  # written by an older version
    assert plan(cfg, run)[0].reasons == ["completed by an older version without a fingerprint"]
    assert run.stage_summary("ingest") == {"rows_in": 3}


def test_stages_left_out_of_the_run_are_reported_stale(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    _complete(cfg, run)
    only_ingest = _cfg(tmp_path, "stages=[ingest]", "train.learning_rate=0.5")
    stale = stale_outside(only_ingest, run)
    assert list(stale) == ["train", "evaluate"]
    assert stale["train"] == ["train.learning_rate: 2e-05 -> 0.5"]


def test_manifest_detects_truncated_changed_and_missing_parts(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    table = pa.table({"x": list(range(100))})
    run.write_table("t", table, "part-0")
    run.write_table("t", table, "part-1")
    run.write_json("t/meta.json", {"a": 1})
    manifest = run.manifest(["t", "absent"])
    assert sorted(manifest) == ["t/meta.json", "t/part-0.parquet", "t/part-1.parquet"]
    assert manifest["t/part-0.parquet"]["rows"] == 100
    assert run.verify_manifest(manifest) == []

    path = run.path("t", "part-0.parquet")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])  # a part cut short
    run.remove("t", "part-1.parquet")
    bad = dict(run.verify_manifest(manifest))
    assert bad["t/part-1.parquet"] == "missing"
    assert bad["t/part-0.parquet"].startswith("unreadable")
    assert run.drop_unreadable("t", log=lambda *_: None) == [path]
    assert run.table_files("t") == []


def test_plan_reruns_a_stage_whose_parts_are_damaged(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    run.write_table("sequences", pa.table({"user_id": ["u1", "u2"]}), "part-0")
    step = next(s for s in plan(cfg, run) if s.stage == "prepare")
    run.write_stage_record(
        "prepare",
        {**step.fingerprint.record(), "parts": run.manifest(["sequences"]), "summary": {}},
    )
    assert not next(s for s in plan(cfg, run) if s.stage == "prepare").run
    run.write_table("sequences", pa.table({"user_id": ["u1"]}), "part-0")  # replaced by hand
    step = next(s for s in plan(cfg, run) if s.stage == "prepare")
    assert step.run and step.reasons[0].startswith("output sequences/part-0.parquet changed")


# --------------------------------------------------------------------------- the lease


def test_a_second_pipeline_on_the_same_run_dir_is_refused_naming_the_holder(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with RunLease(run, log=lambda *_: None):
        with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            RunLease(run, log=lambda *_: None).acquire()
    assert not run.exists(LEASE_FILE)  # released
    with RunLease(run, log=lambda *_: None):
        pass


def test_a_lease_held_by_another_live_process_is_refused_and_taken_over_when_it_dies(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    code = (
        "import sys, time; from mllm_msr.runtime import RunDir; from mllm_msr.lease import "
        "RunLease; RunLease(RunDir(sys.argv[1]), log=print).acquire(); print('held', "
        "flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, run.uri], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            RunLease(run, log=lambda *_: None).acquire()
    finally:
        holder.kill()
        holder.wait()
    logs: list[str] = []
    lease = RunLease(run, log=logs.append).acquire()  # the holder is gone: taken over at once
    assert "is gone" in logs[0]
    lease.release()


def test_a_lease_of_another_host_is_taken_over_only_after_its_heartbeat_stops(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    other = {"host": "node-7", "pid": 1, "started_at": time.time(), "token": "t"}
    run.write_json(LEASE_FILE, {**other, "heartbeat_at": time.time()})
    with pytest.raises(LeaseHeld, match="pid 1 on host node-7"):
        RunLease(run, ttl_s=60, log=lambda *_: None).acquire()
    run.write_json(LEASE_FILE, {**other, "heartbeat_at": time.time() - 300})
    logs: list[str] = []
    with RunLease(run, ttl_s=60, log=logs.append):
        assert "no heartbeat for 300 s" in logs[0]


def test_a_holder_whose_lease_was_taken_stops(tmp_path):
    from mllm_msr.lease import LeaseLost

    run = RunDir(str(tmp_path / "run"))
    lease = RunLease(run, heartbeat_s=0.05, log=lambda *_: None).acquire()
    run.write_json(LEASE_FILE, {"host": "x", "pid": 1, "token": "other"})
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert run.exists(LEASE_FILE)  # not ours: left alone


def test_a_stage_without_progress_fails_naming_the_stage(tmp_path, monkeypatch):
    from mllm_msr import pipeline, runtime
    from mllm_msr.watchdog import StageStalled

    def stuck(cfg, run):
        time.sleep(60)  # a hang: nothing written

    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "stage_function", lambda name: stuck)
    cfg = _cfg(tmp_path, "stages=[ingest]", "no_progress_timeout_s=1")
    t0 = time.monotonic()
    with pytest.raises(
        StageStalled, match="stage 'ingest' made no progress.*no_progress_timeout_s"
    ):
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    assert time.monotonic() - t0 < 20
    assert not RunDir(cfg.run_dir).stage_done("ingest")
    assert not RunDir(cfg.run_dir).exists(LEASE_FILE)  # the lease is released on failure
