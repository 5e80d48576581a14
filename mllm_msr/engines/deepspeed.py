"""The only module that imports :mod:`deepspeed`: ZeRO config, engine, checkpoints, gathering.

Measured on CPU (DESIGN §3): DeepSpeed picks its CPU accelerator by itself and reuses the gloo
process group Ray Train opened. It compiles C++ ops on first use into ``TORCH_EXTENSIONS_DIR``:
``deepspeed_shm_comm`` always (~50-60 s, once per machine), ``fused_adam`` (~80 s) when the
optimizer is declared in the DeepSpeed config and ``cpu_adam`` (~50 s) for ZeRO offload. So,
unless offloading (which needs DeepSpeed's own CPU Adam), we pass a torch ``AdamW`` with
``zero_allow_untested_optimizer: true``. :func:`warm_ops` builds the communication op ahead of
time (CI, image builds).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch

from mllm_msr.config import TrainConfig

CHECKPOINT_TAG = "state"
"""DeepSpeed checkpoint tag inside each Ray Train checkpoint directory."""


def set_extensions_dir(cache_dir: str | os.PathLike) -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` into our cache (unless already set) and return it."""
    path = os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache_dir) / "torch_extensions"))
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def warm_ops(cache_dir: str | os.PathLike) -> bool:
    """Build (or load the cached) ``deepspeed_shm_comm`` op; True when it is available."""
    set_extensions_dir(cache_dir)
    from deepspeed.comm.torch import build_shm_op

    return build_shm_op() is not None


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


def initialize(model: torch.nn.Module, train: TrainConfig, world_size: int) -> Any:
    """Wrap ``model`` (its trainable parameters) in a DeepSpeed engine and return the engine."""
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
