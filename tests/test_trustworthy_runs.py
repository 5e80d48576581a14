"""Issue 13's scenarios on real stages: a run directory never serves stale or damaged results.

Each test replays what a careful user did on the reduced demo and what went wrong before the
stage contract (see the issue): a changed setting silently ignored, a stale checkpoint resumed
on a new split, valid summaries deleted by a failing rerun, a damaged part skipped or fatal,
an empty k-core marked done, the fine-tuned row dropped by ``stages=[evaluate]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mllm_msr.config import load_config
from mllm_msr.pipeline import run_pipeline
from mllm_msr.runtime import RunDir

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "ingest.demo_users=60",
    "ingest.demo_items=40",
    "item_summaries.enabled=false",  # titles as summaries: no engine
    "item_summaries.pool.batch_size=8",
]


def _cfg(tmp_path, *overrides):
    return load_config(
        ROOT / "configs" / "demo-cpu.yaml", [f"run_dir={tmp_path / 'run'}", *SMALL, *overrides]
    )


def _quiet(*_):
    pass


def _ran(summary: dict) -> list[str]:
    return [s for s, v in summary["stages"].items() if not v["skipped"]]


def test_a_changed_setting_reruns_its_stage_and_says_which_key_changed(ray_local, tmp_path):
    stages = "stages=[ingest,prepare,item_summaries]"
    first = run_pipeline(_cfg(tmp_path, stages), log=_quiet)
    assert _ran(first) == ["ingest", "prepare", "item_summaries"]
    run = RunDir(str(tmp_path / "run"))
    split = run.read_table("sequences", ["user_id", "split"]).sort_by("user_id")

    logs: list[str] = []
    again = run_pipeline(_cfg(tmp_path, stages, "prepare.seed=7"), log=logs.append)
    assert _ran(again) == ["prepare"]  # before: every stage with a marker was skipped
    assert "[pipeline] plan: prepare: run (prepare.seed: 42 -> 7)" in logs
    assert again["stages"]["prepare"]["reasons"] == ["prepare.seed: 42 -> 7"]
    resplit = run.read_table("sequences", ["user_id", "split"]).sort_by("user_id")
    assert resplit["split"].to_pylist() != split["split"].to_pylist()
    record = run.stage_record("prepare")
    assert record["config"]["prepare.seed"] == 7
    assert json.loads(Path(run.path("config.json")).read_text())["prepare"]["seed"] == 7
    assert _ran(run_pipeline(_cfg(tmp_path, stages, "prepare.seed=7"), log=_quiet)) == []


def test_damaged_parts_are_noticed_and_redone_never_fatal(ray_local, tmp_path):
    stages = "stages=[ingest,prepare,item_summaries]"
    run_pipeline(_cfg(tmp_path, stages), log=_quiet)
    run = RunDir(str(tmp_path / "run"))
    candidates = run.read_table("candidates").sort_by([("user_id", "ascending")])
    summaries = run.read_table("item_summaries").sort_by("item_id")

    def truncate(path: str) -> int:
        rows = pq.read_metadata(path).num_rows
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        return rows

    truncate(run.table_files("candidates")[0])
    lost = truncate(run.table_files("item_summaries")[0])
    logs: list[str] = []
    again = run_pipeline(_cfg(tmp_path, stages), log=logs.append)
    assert _ran(again) == ["prepare", "item_summaries"]  # before: skipped, damage unnoticed
    assert any("output candidates/part-" in line and "unreadable" in line for line in logs)
    assert run.read_table("candidates").sort_by([("user_id", "ascending")]).equals(candidates)
    assert run.stage_summary("item_summaries")["summarized"] == lost  # only the lost rows
    assert run.read_table("item_summaries").sort_by("item_id").equals(summaries)

    # --force with a damaged part: before, the stage crashed on it every time
    truncate(run.table_files("item_summaries")[-1])
    forced = run_pipeline(_cfg(tmp_path, stages), force=["item_summaries"], log=_quiet)
    assert _ran(forced) == ["item_summaries"]
    assert run.stage_summary("item_summaries")["summarized"] == summaries.num_rows
    assert run.read_table("item_summaries").sort_by("item_id").equals(summaries)


@pytest.mark.parametrize("check_models", ["true", "false"])  # the pipeline's check, the stage's
def test_a_failing_rerun_deletes_no_valid_summary(ray_local, tmp_path, check_models):
    stages = "stages=[ingest,item_summaries]"
    run_pipeline(_cfg(tmp_path, stages), log=_quiet)
    run = RunDir(str(tmp_path / "run"))
    before = run.read_table("item_summaries").sort_by("item_id")
    assert before.num_rows == 40
    bad = _cfg(
        tmp_path,
        stages,
        "item_summaries.enabled=true",
        "item_summaries.engine.model=/nonexistent",
        f"check_models={check_models}",
    )
    with pytest.raises(ValueError, match="/nonexistent"):
        run_pipeline(bad, force=["item_summaries"], log=_quiet)
    assert run.read_table("item_summaries").sort_by("item_id").equals(before)


def test_an_empty_kcore_is_an_error_naming_the_settings(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "stages=[ingest,prepare]", "prepare.user_core=500")
    with pytest.raises(ValueError, match=r"prepare.user_core / prepare.item_core"):
        run_pipeline(cfg, log=_quiet)
    run = RunDir(str(tmp_path / "run"))
    assert run.stage_done("ingest") and not run.stage_done("prepare")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_resplit_trains_fresh_and_evaluate_alone_keeps_the_fine_tuned_row(ray_local, tmp_path):
    train = [
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.image_size=56",
        "evaluate.max_users=3",
        "evaluate.baselines=[popularity]",
    ]
    stages = "stages=[ingest,prepare,item_summaries,train,evaluate]"
    first = run_pipeline(_cfg(tmp_path, stages, *train), log=_quiet)
    run = RunDir(str(tmp_path / "run"))
    assert run.stage_summary("train")["steps"] == 4
    assert set(run.read_json("metrics.json")["methods"]) == {"fine_tuned", "popularity"}
    assert first["stages"]["train"]["skipped"] is False

    # The command: re-split the users and change the learning rate. Before, train
    # resumed the finished checkpoint (0 steps) and evaluated the old adapter on the new split.
    changed = _cfg(tmp_path, stages, *train, "prepare.seed=7", "train.learning_rate=0.5")
    again = run_pipeline(changed, force=["prepare"], log=_quiet)
    assert _ran(again) == ["prepare", "train", "evaluate"]
    summary = run.stage_summary("train")
    assert summary["resumed_from_steps"] == [] and [s for s, _ in summary["losses"]] == [1, 2, 3, 4]
    assert run.stage_record("train")["config"]["train.learning_rate"] == 0.5
    candidates = run.read_table("candidates", ["user_id", "split"])
    trained = set(
        pc.filter(candidates["user_id"], pc.equal(candidates["split"], "train")).to_pylist()
    )
    scores = pq.read_table(run.path("scores", "fine_tuned.parquet"))
    assert not set(scores["user_id"].to_pylist()) & trained  # no test user was a training user

    # A plain rerun with a larger max_steps continues from the checkpoint (same samples).
    more = _cfg(
        tmp_path, stages, *train, "prepare.seed=7", "train.learning_rate=0.5", "train.max_steps=6"
    )
    run_pipeline(more, log=_quiet)
    assert run.stage_summary("train")["resumed_from_steps"] == [4]

    # Re-evaluating alone keeps the fine-tuned row (before: dropped, as train was not in
    # stages) and removes score files of methods no longer scored.
    run.write_table("scores", pq.read_table(run.path("scores", "popularity.parquet")), "sasrec")
    alone = _cfg(
        tmp_path,
        "stages=[evaluate]",
        *train,
        "prepare.seed=7",
        "train.learning_rate=0.5",
        "train.max_steps=6",
        "evaluate.ks=[1,5]",
    )
    out = run_pipeline(alone, log=_quiet)
    assert _ran(out) == ["evaluate"]
    metrics = run.read_json("metrics.json")
    assert set(metrics["methods"]) == {"fine_tuned", "popularity"} and metrics["ks"] == [1, 5]
    names = sorted(Path(p).name for p in run.table_files("scores"))
    assert names == ["fine_tuned.parquet", "popularity.parquet"]
