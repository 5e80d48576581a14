"""No-progress watchdog (issue 13): a stalled stage fails naming itself instead of hanging."""

from __future__ import annotations

import threading
import time

import pytest

from mllm_msr.watchdog import (
    RAY_DATA_SETTING,
    StageStalled,
    configure_ray_data_no_progress,
    no_progress_watchdog,
    ray_data_no_progress,
)

pytestmark = pytest.mark.timeout(30)


def test_stall_interrupts_a_sleeping_main_thread_and_names_the_stage():
    t0 = time.monotonic()
    with pytest.raises(StageStalled) as err:
        with no_progress_watchdog(
            "item_summaries", 0.3, lambda: 7, setting="stages.item_summaries.no_progress_s"
        ):
            time.sleep(20)  # woken by the watchdog's SIGINT
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "stage 'item_summaries' made no progress for" in msg
    assert "limit 0.3 s" in msg and "last progress value 7" in msg
    assert "raise stages.item_summaries.no_progress_s" in msg
    assert err.value.stage == "item_summaries" and err.value.idle_s >= 0.3


def test_stall_interrupts_a_blocking_wait():
    with pytest.raises(StageStalled, match="stage 'ingest'"):
        with no_progress_watchdog("ingest", 0.2, lambda: None):
            threading.Event().wait(20)


def test_changing_progress_keeps_the_stage_alive():
    counter = [0]
    with no_progress_watchdog("prepare", 0.3, lambda: counter[0], poll_s=0.02):
        for _ in range(40):  # 0.8 s, longer than the limit, progressing every 0.02 s
            counter[0] += 1
            time.sleep(0.02)


def test_beats_count_as_progress_until_they_stop():
    with pytest.raises(StageStalled, match="stage 'train'.*last progress value 20"):
        with no_progress_watchdog("train", 0.3, poll_s=0.02) as watchdog:
            for _ in range(20):  # 0.6 s of beats
                watchdog.beat()
                time.sleep(0.03)
            time.sleep(20)


def test_a_failing_probe_counts_as_no_progress():
    def probe():
        raise OSError("listing failed")

    with pytest.raises(StageStalled, match="stage 'score'"):
        with no_progress_watchdog("score", 0.2, probe):
            time.sleep(20)


def test_disabled_and_finished_blocks_do_not_raise():
    for limit in (None, 0, -1):
        with no_progress_watchdog("evaluate", limit, lambda: 0, poll_s=0.01) as watchdog:
            time.sleep(0.1)
        assert watchdog.stalled is None
    with no_progress_watchdog("evaluate", 5, lambda: 0) as watchdog:
        pass
    assert watchdog.stalled is None
    time.sleep(0.1)  # nothing is pending afterwards


def test_other_errors_pass_through():
    with pytest.raises(ValueError, match="bad row"):
        with no_progress_watchdog("prepare", 5, lambda: 0):
            raise ValueError("bad row")


def test_stall_in_a_worker_thread_raises_there():
    result: list[BaseException | str] = []

    def stage() -> None:
        try:
            with no_progress_watchdog("user_preferences", 0.2, lambda: 1):
                while True:  # busy in Python: the asynchronous exception lands at once
                    time.sleep(0.01)
        except StageStalled as e:
            result.append(e)
        else:
            result.append("finished")

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert len(result) == 1 and isinstance(result[0], StageStalled)
    assert "stage 'user_preferences' made no progress" in str(result[0])
    time.sleep(0.1)  # and the main thread was left alone


def test_configure_ray_data_no_progress():
    from ray.data import DataContext

    ctx = DataContext()
    assert configure_ray_data_no_progress(120, ctx) is True
    assert getattr(ctx, RAY_DATA_SETTING) == 120.0
    assert configure_ray_data_no_progress(None, ctx) is True
    assert getattr(ctx, RAY_DATA_SETTING) == -1
    assert configure_ray_data_no_progress(120, object()) is False  # a Ray without the setting


def test_ray_data_timeout_becomes_stage_stalled_and_setting_is_restored():
    from ray.data import DataContext
    from ray.data.exceptions import ExecutionTimeoutError

    ctx = DataContext.get_current()
    before = getattr(ctx, RAY_DATA_SETTING)
    with pytest.raises(StageStalled, match="stage 'item_summaries'.*limit 60 s") as err:
        with ray_data_no_progress("item_summaries", 60, setting="x.no_progress_s") as available:
            assert available and getattr(ctx, RAY_DATA_SETTING) == 60
            try:
                raise ExecutionTimeoutError("Dataset execution made no progress")
            except ExecutionTimeoutError as e:
                raise RuntimeError("wrapped") from e
    assert "Dataset execution made no progress" in str(err.value)
    assert getattr(ctx, RAY_DATA_SETTING) == before
    with pytest.raises(KeyError):  # anything else passes through
        with ray_data_no_progress("item_summaries", 60):
            raise KeyError("x")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_data_guard_fails_a_stuck_dataset(ray_local):
    """Ray 2.60's own guard, as configured here: a map stuck for longer than the limit fails
    the stage within seconds (the default would wait 30 min)."""
    import ray

    def stuck(batch):
        time.sleep(30)
        return batch

    t0 = time.monotonic()
    with pytest.raises(StageStalled, match="stage 'toy'.*limit 2 s") as err:
        with ray_data_no_progress("toy", 2, setting="stages.toy.no_progress_s"):
            ray.data.range(4, override_num_blocks=2).map_batches(stuck).take_all()
    assert time.monotonic() - t0 < 25
    assert "execution_no_progress_timeout_s" in str(err.value)  # Ray's own explanation follows


def test_an_engine_sigint_handler_does_not_swallow_the_stall():
    """vLLM installs a SIGINT handler that exits with status 0; the watchdog's own handler
    takes the block's interrupt, and the engine's handler is back afterwards."""
    import signal
    import sys

    def engine_handler(signum, frame):
        sys.exit(0)

    before = signal.signal(signal.SIGINT, engine_handler)
    try:
        t0 = time.monotonic()
        with pytest.raises(StageStalled, match="stage 'train'"):
            with no_progress_watchdog("train", 0.2, lambda: None):
                time.sleep(20)
        assert time.monotonic() - t0 < 5
        assert signal.getsignal(signal.SIGINT) is engine_handler
    finally:
        signal.signal(signal.SIGINT, before)
