"""The only module that imports :mod:`deepspeed`: ZeRO config, engine, checkpoints, gathering.

Measured on CPU (DESIGN §3): DeepSpeed picks its CPU accelerator by itself and reuses the gloo
process group Ray Train opened. It compiles C++ ops on first use into ``TORCH_EXTENSIONS_DIR``:
``deepspeed_shm_comm`` always (~50-60 s, once per machine), ``fused_adam`` (~80 s) when the
optimizer is declared in the DeepSpeed config and ``cpu_adam`` (~50 s) for ZeRO offload. So,
unless offloading (which needs DeepSpeed's own CPU Adam), we pass a torch ``AdamW`` with
``zero_allow_untested_optimizer: true``. :func:`warm_ops` builds the communication op ahead of
time (CI, image builds).

Op builds and loads are serialized by our own kernel lock (:func:`op_lock`). torch's JIT loader
(``torch.utils.cpp_extension._jit_compile``) takes a ``FileBaton`` -- a ``lock`` file created
with ``O_EXCL`` in the op's build directory -- on *every* load, not only on a build, and waits
for it to disappear forever. A process killed while loading or building an op leaves that file
behind and every later training hung. Under our ``fcntl.flock`` (which the kernel drops when its
holder dies) no live process of ours holds the baton, so a ``lock`` file found there is stale and
is removed. :func:`ensure_ops` installs this around DeepSpeed's ``OpBuilder.jit_load`` (every JIT
load of every op) and loads the communication op; :func:`initialize` calls it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch

from mllm_msr.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
"""DeepSpeed checkpoint tag inside each Ray Train checkpoint directory."""

OP_LOCK_FILE = "mllm_msr.flock"
"""Our kernel lock, in the extensions root next to the ops' build directories."""
BATON_FILE = "lock"
"""torch's ``FileBaton`` file in an extension's build directory (``cpp_extension._jit_compile``)."""
OP_LOCK_TIMEOUT_S = 1800.0
"""Give up waiting for another live process's op build/load after this long (it logs meanwhile);
``$MLLM_MSR_OP_LOCK_TIMEOUT_S`` overrides it."""


def set_extensions_dir(cache_dir: str | os.PathLike) -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` into our cache (unless already set) and return it."""
    from mllm_msr.runtime import apply_process_env

    apply_process_env(cache_dir, gpu=False, prefix="TORCH_EXTENSIONS_DIR")
    path = os.environ["TORCH_EXTENSIONS_DIR"]
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def op_build_dir(name: str) -> Path:
    """The directory torch's JIT loader builds and loads extension ``name`` in."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except ImportError:  # private helper gone: its documented behaviour
        from torch.utils.cpp_extension import get_default_build_root

        return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


_held = threading.local()


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def op_lock(name: str, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the extensions root's kernel lock while building/loading op ``name``; yield its
    build directory.

    ``fcntl.flock`` on ``<extensions root>/mllm_msr.flock``: the kernel releases it when its
    holder dies, so a killed loader never blocks the next one. Waiting is logged (with the
    holder written into the file) and gives up after ``timeout_s`` (default
    ``$MLLM_MSR_OP_LOCK_TIMEOUT_S`` or 1800 s). While it is held, torch's ``FileBaton`` file in
    the build directory is stale by construction (every process of ours takes this lock before
    torch takes the baton) and is removed. Re-entrant within a thread.
    """
    build_dir = op_build_dir(name)
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield build_dir
        finally:
            _held.depth -= 1
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get("MLLM_MSR_OP_LOCK_TIMEOUT_S", OP_LOCK_TIMEOUT_S))
    lock_path = build_dir.parent / OP_LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = last_log = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if not waited or now - last_log >= 60:
                    log.warning(
                        "waiting for %s (held by %s) to load op %s; waited %.0f s",
                        lock_path,
                        _holder(lock_path),
                        name,
                        now - start,
                    )
                    waited, last_log = True, now
                if now - start >= timeout_s:
                    raise TimeoutError(
                        f"DeepSpeed op {name}: {lock_path} still held by {_holder(lock_path)} "
                        f"after {timeout_s:.0f} s (raise MLLM_MSR_OP_LOCK_TIMEOUT_S if a build "
                        "is legitimately this slow)"
                    ) from None
                time.sleep(0.2)
        if waited:
            log.info("got %s after %.0f s", lock_path, time.monotonic() - start)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} for op {name}\n".encode(), 0)
        baton = build_dir / BATON_FILE
        if baton.exists():
            log.warning(
                "removing stale torch extension build lock %s (left by a process that died "
                "while building or loading %s; no live process holds %s)",
                baton,
                name,
                lock_path,
            )
            baton.unlink(missing_ok=True)
        _held.depth = 1
        try:
            yield build_dir
        finally:
            _held.depth = 0
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _install_op_lock() -> None:
    """Make every JIT load/build of a DeepSpeed op (``OpBuilder.jit_load``) go through
    :func:`op_lock`. Prebuilt ops (``DS_BUILD_OPS=1`` installs) are imported without torch's
    baton and are left alone. Idempotent."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    jit_load = OpBuilder.jit_load
    if getattr(jit_load, "_mllm_msr_op_lock", False):
        return

    @functools.wraps(jit_load)
    def locked_jit_load(self, *args, **kwargs):
        with op_lock(self.name):
            return jit_load(self, *args, **kwargs)

    locked_jit_load._mllm_msr_op_lock = True  # type: ignore[attr-defined]
    OpBuilder.jit_load = locked_jit_load


def _quiet_op_notes() -> None:
    """DeepSpeed ``print``s "DeepSpeed <op> built successfully" on every load of a cached op
    (several times per rank): a debug log line instead, unless ``--log-level DEBUG``."""
    import builtins
    import importlib

    from mllm_msr import console

    # not ``import deepspeed.comm.torch as m``: deepspeed.comm's attribute ``torch`` is torch
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    if console.engine_level() == "DEBUG" or getattr(ds_torch, "print", None) is not None:
        return

    def quiet_print(*args, **kwargs):
        text = " ".join(map(str, args))
        if "built successfully" in text:
            log.debug("%s", text)
            return
        builtins.print(*args, **kwargs)

    ds_torch.print = quiet_print  # module global: shadows the builtin in that module only


def ensure_ops() -> bool:
    """Guard every DeepSpeed op load with :func:`op_lock` and load (building once per
    extensions directory) the ``deepspeed_shm_comm`` op that ``deepspeed.initialize`` loads on
    CPU; True when that op is available. Call before anything that may load a DeepSpeed op.
    """
    _install_op_lock()
    _quiet_op_notes()
    from deepspeed.comm.torch import build_shm_op

    return build_shm_op() is not None


def warm_ops(cache_dir: str | os.PathLike) -> bool:
    """Build (or load the cached) ``deepspeed_shm_comm`` op; True when it is available."""
    set_extensions_dir(cache_dir)
    return ensure_ops()


def use_bf16(train: TrainConfig) -> bool:
    """bf16 mixed precision when asked for; fp32 otherwise (the CPU default)."""
    return train.precision == "bf16"


def build_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``train`` on ``world_size`` data-parallel ranks."""
    zero: dict[str, Any] = {"stage": train.zero.stage}
    if train.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero.offload_params:
        if train.zero.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero.stage == 3:
        # Export gathers adapter weights explicitly; never gather a 16-bit copy of the base.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if train.zero.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = train.zero.persistence_threshold
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offloads_optimizer(train):
        # ZeRO offload steps the optimizer on CPU with DeepSpeed's own (compiled) CPU Adam.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay},
        }
    else:
        config["zero_allow_untested_optimizer"] = True
    return config


def offloads_optimizer(train: TrainConfig) -> bool:
    return train.zero.offload_optimizer or train.zero.offload_params


def initialize(
    model: torch.nn.Module, train: TrainConfig, world_size: int, lr_scheduler: Any = None
) -> Any:
    """Wrap ``model`` (its trainable parameters) in a DeepSpeed engine and return the engine.

    ``lr_scheduler``: a callable ``optimizer -> scheduler`` (DeepSpeed builds it on the
    optimizer it ends up with, its own one under ZeRO offload), stepped at every optimizer step
    and saved in the checkpoints."""
    ensure_ops()  # before deepspeed.initialize -> init_distributed -> TorchBackend loads the op
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if not offloads_optimizer(train):
        optimizer = torch.optim.AdamW(
            params, lr=train.learning_rate, weight_decay=train.weight_decay
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=build_config(train, world_size),
    )
    return engine


def save_checkpoint(engine: Any, directory: str | os.PathLike, client_state: dict) -> None:
    """Save this rank's shard of the trainable state (every rank must call it).

    Frozen base weights are left out: they are re-read from the base model on resume.
    """
    engine.save_checkpoint(
        str(directory),
        tag=CHECKPOINT_TAG,
        client_state=client_state,
        exclude_frozen_parameters=True,
    )


def load_checkpoint(engine: Any, directory: str | os.PathLike) -> dict:
    """Restore adapter weights, optimizer state and step; return the saved client state."""
    path, client_state = engine.load_checkpoint(
        str(directory), tag=CHECKPOINT_TAG, load_module_strict=False
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {CHECKPOINT_TAG!r} under {directory}")
    return client_state or {}


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], stage: int) -> Iterator[None]:
    """Make full copies of ``params`` visible on every rank (ZeRO-3 partitions them).

    Collective under ZeRO-3: every rank must enter it.
    """
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's piece of ``param``: its ZeRO-3 partition, or the tensor itself."""
    return getattr(param, "ds_tensor", param.data)


def rank_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank holds: model parameters (its ZeRO-3 partition, or all of them), the fp32
    partition of the trainable parameters that ZeRO reduces gradients into, and optimizer state.
    """
    params = 0
    for p in engine.module.parameters():
        if getattr(p, "ds_persist", False):  # ZeRO-3 keeps small parameters whole on every rank
            params += p.ds_numel * p.ds_tensor.element_size()
        else:
            params += local_tensor(p).numel() * local_tensor(p).element_size()
    optimizer = engine.optimizer
    flat = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if flat is None:
        flat = getattr(optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3
    grads = sum(t.numel() * t.element_size() for t in flat)
    inner = getattr(optimizer, "optimizer", optimizer)
    opt_state = sum(
        v.numel() * v.element_size()
        for state in getattr(inner, "state", {}).values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return {"params": int(params), "grads": int(grads), "optimizer": int(opt_state)}


if __name__ == "__main__":  # python -m mllm_msr.engines.deepspeed: build the comm op (CI warm-up)
    from mllm_msr.tiny import default_cache_dir

    print("deepspeed_shm_comm available:", warm_ops(default_cache_dir()))
