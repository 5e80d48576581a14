"""Issue 16 (items 1, 2, 7): progress lines, what counts as the project's console lines, and one
CLI (``mllm-msr <job>``, job names = stage names, aliases, ``--print-config``, ``--help``)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reduced_demo import REDUCED_DEMO

from mllm_msr import cli, console
from mllm_msr.contract import ORDER
from mllm_msr.progress import Progress, format_duration, format_rate

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- progress


def test_durations_and_rates_read_as_written():
    assert format_duration(7.4) == "7 s"
    assert format_duration(187) == "3m07s"
    assert format_duration(7500) == "2h05m"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"
    assert format_rate(3.1, "items") == "3.10 items/s"
    assert format_rate(42.26, "rows") == "42.3 rows/s"
    assert format_rate(250.4, "rows") == "250 rows/s"
    assert format_rate(0.08, "steps") == "12.5 s/step"
    assert format_rate(None, "items") == "? items/s"


def test_progress_line_has_count_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress("item_summaries", total=100, unit="items", stream=out, tty=False, clock=clock)
    clock.now += 10
    p.set(25)
    assert out.getvalue() == "[item_summaries] 25/100 items (25%)  2.50 items/s  ETA 30 s\n"
    assert console.is_project_line(out.getvalue())


def test_progress_prints_at_most_every_interval_and_always_the_last_update():
    clock, out = Clock(), io.StringIO()
    p = Progress("evaluate", total=10, unit="rows", every_s=5, stream=out, tty=False, clock=clock)
    printed = []
    for _ in range(9):
        clock.now += 1
        printed.append(p.update(1))
    # the first update prints, then one line per 5 s
    assert printed == [True, False, False, False, False, True, False, False, False]
    clock.now += 1
    assert p.update(1, method="zero_shot")  # done == total: always printed
    p.close()  # nothing new: no second final line
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and p.printed == 3
    assert lines[-1].startswith("[evaluate] 10/10 rows (100%)") and "method zero_shot" in lines[-1]
    assert "in 10 s" in lines[-1]


def test_progress_close_prints_an_unfinished_count_once():
    clock, out = Clock(), io.StringIO()
    p = Progress("user_preferences", total=None, unit="blocks", stream=out, tty=False, clock=clock)
    p.update(3)
    clock.now += 1
    p.update(2)  # within the interval: not printed
    p.close()
    p.close()
    assert out.getvalue().splitlines() == [
        "[user_preferences] 3 blocks  ? blocks/s  in 0 s",
        "[user_preferences] 5 blocks  5.00 blocks/s  in 1 s",
    ]


def test_progress_on_a_terminal_redraws_one_line():
    clock, out = Clock(), io.StringIO()
    p = Progress("train", total=4, unit="steps", every_s=5, stream=out, tty=True, clock=clock)
    assert p.every_s == 0.5  # live line: redrawn at most twice a second
    for _ in range(4):
        clock.now += 1
        p.update(1, loss=0.5)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1


def test_progress_rate_counts_from_the_initial_value():
    clock, out = Clock(), io.StringIO()
    p = Progress("train", total=10, unit="steps", initial=6, stream=out, tty=False, clock=clock)
    clock.now += 2
    p.set(8)
    assert "8/10 steps (80%)  1.00 steps/s  ETA 2 s" in out.getvalue()


# --------------------------------------------------------------------------- console lines


@pytest.mark.parametrize(
    "line, ours",
    [
        ("[pipeline] train: running (not run yet)", True),
        ("[item_summaries] 60/60 items (100%)  2.45 items/s  in 24 s", True),
        ("\x1b[36m(RayTrainWorker pid=30616)\x1b[0m [train] 4/4 steps (100%)", True),
        ("(MapWorker(MapBatches(PreferenceWorker)) pid=29261) [user_preferences] x", True),
        ("[ingest]   items         read        60  written        60", True),
        ("2026-11-29 19:09:34,015\tINFO worker.py:2038 -- Started a local Ray instance.", False),
        (
            "(MapWorker(MapBatches(X)) pid=1) (MainProcess pid=1) WARNING 11-29 [cpu_worker.py:140]",
            False,
        ),
        ("[transformers] Qwen2VL video processing does not apply", False),
        ("[2026-11-29 19:45:45,467 E 26821 26821] core_worker.cc:2465: Actor", False),
    ],
)
def test_what_counts_as_a_project_line(line, ours):
    assert console.is_project_line(line) is ours


def test_every_stage_is_a_project_tag():
    assert set(ORDER) <= set(console.PROJECT_TAGS)
    counts = console.line_counts("[pipeline] a\n\nnoise\n[train] b\n(RayTrainWorker pid=3) \n")
    assert counts == {"total": 3, "ours": 2, "share": 2 / 3}
    assert console.foreign_lines("[pipeline] a\nnoise\n") == ["noise"]


def test_engine_levels_follow_ours(monkeypatch):
    for key in list(os.environ):
        if key.startswith("_MLLM_MSR_SET_") or key in console.worker_env("INFO"):
            monkeypatch.delenv(key, raising=False)
    assert console.engine_level("INFO") == "WARNING"
    assert console.engine_level("DEBUG") == "DEBUG"
    env = console.worker_env("INFO")
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["RAY_DATA_LOG_LEVEL"] == "WARNING"
    assert console.worker_env("DEBUG")["VLLM_LOGGING_LEVEL"] == "DEBUG"
    import logging

    console.configure("INFO")
    noisy = logging.getLogger("vllm.v1.worker.cpu_worker")
    assert not noisy.filter(
        logging.LogRecord(
            noisy.name,
            logging.WARNING,
            "x",
            1,
            "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",
            None,
            None,
        )
    )
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("mllm_msr").getEffectiveLevel() == logging.INFO
    console.configure("DEBUG")
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.DEBUG
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    console.configure("INFO")


# --------------------------------------------------------------------------- one CLI


def test_every_stage_has_a_job_named_after_it_and_aliases_call_the_same_code():
    for stage in ORDER:
        assert stage in cli.STAGE_JOBS and (REPO / "jobs" / f"{stage}.py").is_file()
    assert (REPO / "jobs" / "pipeline.py").is_file()
    for alias, stage in cli.ALIASES.items():
        text = (REPO / "jobs" / f"{alias}.py").read_text()
        assert f'STAGE = "{stage}"' in text and "cli.stage_main(STAGE" in text
        assert cli.resolve_job(alias) == stage
    assert cli.resolve_job("item-summaries") == "item_summaries"
    with pytest.raises(SystemExit, match="unknown job"):
        cli.resolve_job("summarise")


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\nmllm-msr = "mllm_msr.cli:main"' in text


def test_print_config_prints_the_resolved_yaml(capsys):
    assert cli.main(["train", "--print-config", "train.max_steps=3", "--log-level", "warning"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 3 and "item_summaries" in cfg
    assert cli.main(["pipeline", "--print-config", "--force", "train", "seed=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5
    assert cli.main(["summarize_users", "--print-config"]) == 0
    assert "user_preferences" in yaml.safe_load(capsys.readouterr().out)


def test_usage_lists_jobs_and_aliases(capsys):
    assert cli.main([]) == 2
    text = capsys.readouterr().out
    for job in ("pipeline", *cli.STAGE_JOBS, *cli.ALIASES):
        assert job in text


def _help(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, *args, "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_help_examples_keep_their_line_continuations():
    text = _help(["jobs/train_recommender.py"])  # an alias: the stage job's help
    assert "jobs/train.py \\\n        --config configs/qwen2.5-vl.yaml" in text
    assert "--print-config" in text and "--log-level" in text
    pipeline = _help(["-m", "mllm_msr", "pipeline"])
    assert "python jobs/pipeline.py --config configs/demo-cpu.yaml \\\n" in pipeline
    for job in ("ingest", "prepare", "item_summaries", "user_preferences", "evaluate"):
        doc = cli.job_doc(job)
        for line in doc.splitlines():  # a continuation is a backslash at the end of a line
            assert "\\ " not in line.rstrip() or line.rstrip().endswith("\\")
        assert ".py \\\n" in doc or ".yaml \\\n" in doc, job


# --------------------------------------------------------------------------- the reduced demo

LONG_STAGES = ("item_summaries", "user_preferences", "train", "evaluate")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reduced_demo_console_is_ours_and_every_long_stage_shows_progress(tmp_path):
    """``mllm-msr pipeline`` on the reduced demo: >= 90% of the lines are the project's own
    (:func:`mllm_msr.console.is_project_line`) and each long stage prints a progress line."""
    import re

    env = {**os.environ, "PYTHONPATH": str(REPO), "MLLM_MSR_PROGRESS_S": "5"}
    for key in ("MLLM_MSR_LOG_LEVEL", "VLLM_LOGGING_LEVEL", "RAY_DATA_LOG_LEVEL"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mllm_msr", "pipeline", "--config", "configs/demo-cpu.yaml"]
    cmd += [f"run_dir={tmp_path / 'run'}", *REDUCED_DEMO]
    done = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = done.stdout
    (tmp_path / "console.log").write_text(out)
    assert done.returncode == 0, out[-5000:]
    counts = console.line_counts(out)
    foreign = console.foreign_lines(out)
    assert counts["share"] >= 0.9, (counts, foreign)
    for stage in LONG_STAGES:
        progress = re.compile(rf"\[{stage}\] \d+/\d+ \w+ \(\d+%\)  ")
        assert any(progress.search(ln) for ln in out.splitlines()), (stage, out[-5000:])
    assert "[pipeline] run directory:" in out
