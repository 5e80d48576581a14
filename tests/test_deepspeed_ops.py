"""DeepSpeed op loads never hang on a stale torch build lock (issue 13, "no silent hangs").

torch's JIT loader takes a ``FileBaton`` (an ``O_EXCL`` ``lock`` file in the op's build
directory) on every load and waits forever while it exists; a loader killed meanwhile leaves it
behind. Our loads hold a kernel ``flock`` instead, under which such a file is stale and removed.

Each scenario runs in fresh processes (DeepSpeed caches loaded ops per process). They use the
extensions directory training uses (``$TORCH_EXTENSIONS_DIR`` or ``<cache>/torch_extensions``),
where CI's warm-up (``python -m mllm_msr.engines.deepspeed``) has built the op; the fixture builds
it otherwise (~30-60 s).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OP = "deepspeed_shm_comm"

LOAD = """
import logging
logging.basicConfig(level=logging.INFO)
from mllm_msr.engines.deepspeed import ensure_ops
print("available", ensure_ops(), flush=True)
"""

# Holds our lock and torch's baton the way a loader killed mid-load leaves them.
HOLD = f"""
import time
from mllm_msr.engines.deepspeed import op_lock
with op_lock({OP!r}) as build_dir:
    (build_dir / "lock").touch()
    print("held", flush=True)
    time.sleep(600)
"""

# What a Ray Train worker does (train_loop): the gloo group exists, then ds.initialize.
TRAIN = """
import os
import torch
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from mllm_msr.config import TrainConfig
from mllm_msr.engines import deepspeed as ds
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine = ds.initialize(model, TrainConfig(micro_batch_size=2, grad_accum_steps=1), 1)
loss = engine(torch.randn(2, 4)).pow(2).mean()
engine.backward(loss)
engine.step()
print("stepped", engine.global_steps, flush=True)
"""


def _env(ext_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    env.update(extra)
    return env


def _python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ext_dir() -> Path:
    from mllm_msr.tiny import default_cache_dir

    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_cache_dir() / "torch_extensions")
    path.mkdir(parents=True, exist_ok=True)
    done = _python(LOAD, _env(path), timeout=900)
    assert done.returncode == 0 and "available True" in done.stdout, done.stderr[-3000:]
    assert any((path / OP).glob(f"{OP}*.so")), sorted((path / OP).iterdir())
    return path


@pytest.mark.timeout(150)
def test_stale_build_lock_is_removed_and_load_finishes(ext_dir):
    baton = ext_dir / OP / "lock"
    baton.touch()  # as left by a process killed while torch held it
    t0 = time.monotonic()
    done = _python(LOAD, _env(ext_dir), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "available True" in done.stdout
    assert f"removing stale torch extension build lock {baton}" in done.stderr
    assert not baton.exists()
    assert time.monotonic() - t0 < 120


@pytest.mark.timeout(240)
def test_concurrent_loads_wait_on_the_kernel_lock_not_the_baton(ext_dir, tmp_path):
    """A holder of our lock (with torch's baton taken) is killed; two loaders waiting on the
    lock both load the op: one removes the stale baton, the other then finds none."""
    env = _env(ext_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    loaders: list[subprocess.Popen] = []
    try:
        lines = []
        while not lines or lines[-1] not in ("held", ""):  # DeepSpeed prints to stdout too
            lines.append(holder.stdout.readline().strip())
        assert lines[-1] == "held", lines
        assert (ext_dir / OP / "lock").exists()
        logs = [tmp_path / f"loader{i}.log" for i in range(2)]
        for path in logs:
            with path.open("w") as out:
                loaders.append(
                    subprocess.Popen(
                        [sys.executable, "-c", LOAD], env=env, cwd=REPO, stdout=out, stderr=out
                    )
                )
        deadline = time.monotonic() + 120
        while not all("waiting for" in p.read_text() for p in logs):
            assert time.monotonic() < deadline, [p.read_text()[-2000:] for p in logs]
            assert all(p.poll() is None for p in loaders), [p.read_text()[-2000:] for p in logs]
            time.sleep(0.2)
        holder.kill()  # SIGKILL: the kernel drops its flock; the baton file stays behind
        holder.wait()
        assert (ext_dir / OP / "lock").exists()
        for p in loaders:
            p.wait(timeout=120)
        texts = [p.read_text() for p in logs]
        assert [p.returncode for p in loaders] == [0, 0], [t[-3000:] for t in texts]
        assert all("available True" in t for t in texts)
        assert all(f"held by pid {holder.pid} on " in t for t in texts)
        assert sum("removing stale torch extension build lock" in t for t in texts) == 1
        assert not (ext_dir / OP / "lock").exists()
    finally:
        for p in [holder, *loaders]:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_first_build_one_builds_the_other_waits(tmp_path):
    """Two processes load the op into an empty extensions directory at once: one builds it
    (~30-60 s) while the other waits on the kernel lock, then loads the built op."""
    env = _env(tmp_path / "ext")
    logs = [tmp_path / f"loader{i}.log" for i in range(2)]
    loaders = []
    try:
        for path in logs:
            with path.open("w") as out:
                loaders.append(
                    subprocess.Popen(
                        [sys.executable, "-c", LOAD], env=env, cwd=REPO, stdout=out, stderr=out
                    )
                )
        for p in loaders:
            p.wait(timeout=560)
    finally:
        for p in loaders:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [p.read_text() for p in logs]
    assert [p.returncode for p in loaders] == [0, 0], [t[-3000:] for t in texts]
    assert all("available True" in t for t in texts)
    assert sum("waiting for" in t for t in texts) == 1, [t[-3000:] for t in texts]
    assert not (tmp_path / "ext" / OP / "lock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(200)
def test_initialize_with_a_stale_build_lock_trains(ext_dir):
    """The training workers' path (``ds.initialize`` -> ``deepspeed.initialize`` -> comm
    backend loading the shm op) with a stale baton: one optimizer step instead of a hang."""
    baton = ext_dir / OP / "lock"
    baton.touch()
    env = _env(
        ext_dir,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    done = _python(TRAIN, env, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stepped 1" in done.stdout, done.stdout[-2000:]
    assert "removing stale torch extension build lock" in done.stderr
    assert not baton.exists()


@pytest.mark.timeout(60)
def test_waiting_for_a_live_holder_is_logged_and_times_out(tmp_path, monkeypatch, caplog):
    import threading

    from mllm_msr.engines.deepspeed import op_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with op_lock(OP):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(
            TimeoutError, match=f"still held by pid {os.getpid()} on .* for op {OP}"
        ):
            with op_lock(OP, timeout_s=0.5):
                pass
        assert "waiting for" in caplog.text and "MLLM_MSR_OP_LOCK_TIMEOUT_S" not in caplog.text
    finally:
        release.set()
        holder.join()
    with op_lock(OP, timeout_s=0.5) as build_dir:  # free again; re-entrant in one thread
        with op_lock(OP) as inner:
            assert inner == build_dir == tmp_path / OP
