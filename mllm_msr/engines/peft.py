"""The only module that imports :mod:`peft`: LoRA from our :class:`~mllm_msr.config.LoraConfig`.

LoRA targets are resolved here to explicit module names so that what is adapted is visible and
testable: every ``nn.Linear`` whose last name is in ``target_modules`` (or every linear layer but
the output head for ``"all-linear"``), outside the vision tower and the multimodal projector
unless ``train_vision`` is set, in which case every linear layer of the vision tower and the
projector is adapted too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from mllm_msr import families
from mllm_msr.config import LoraConfig

VISION_MODULE_KEYS = families.ALL_VISION_MODULES
"""Module-name components of any family's vision tower / projector (Qwen2-VL, LLaVA, ...)."""

OUTPUT_HEADS = ("lm_head",)


def is_vision_module(name: str, family: families.Family | None = None) -> bool:
    """Whether the dotted module name lies in a vision tower or multimodal projector
    (``family``'s :attr:`~mllm_msr.families.Family.vision_modules`; any family's without one)."""
    return families.is_vision_module(name, family)


def lora_target_names(
    model: torch.nn.Module, cfg: LoraConfig, family: families.Family | None = None
) -> list[str]:
    """Full names of the linear layers that get LoRA adapters under ``cfg``."""
    wanted = set(cfg.target_modules)
    all_linear = "all-linear" in wanted
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in OUTPUT_HEADS:
            continue
        vision = is_vision_module(name, family)
        if vision and cfg.train_vision:
            names.append(name)
        elif not vision and (all_linear or name.split(".")[-1] in wanted):
            names.append(name)
    if not names:
        raise ValueError(
            f"lora.target_modules {cfg.target_modules} match no linear layer of "
            f"{type(model).__name__}"
        )
    return names


def apply_lora(
    model: torch.nn.Module, cfg: LoraConfig, family: families.Family | None = None
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only adapter weights stay trainable.

    The adapter config names targets by their short names (``q_proj``, ...), the form serving
    engines expect, and lists linear layers with such a name that must stay frozen (e.g. a CLIP
    vision tower's ``q_proj``) in ``exclude_modules``. Seed torch before calling for a
    reproducible ``lora_A`` initialization (``lora_B`` starts at 0).
    """
    selected = lora_target_names(model, cfg, family)
    short = sorted({name.split(".")[-1] for name in selected})
    chosen = set(selected)
    excluded = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.split(".")[-1] in short
        and name not in chosen
    ]
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=short,
        exclude_modules=excluded or None,
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def save_adapter(model: PeftModel, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Save a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``state_dict`` is the full model state dict with gathered LoRA weights (ZeRO-3 partitions
    parameters, so the caller gathers them first); None uses the model's own tensors.
    """
    model.save_pretrained(str(path), state_dict=state_dict)


def load_adapter(
    base_model: torch.nn.Module, path: str | os.PathLike, trainable: bool = False
) -> PeftModel:
    """Load an exported adapter folder onto ``base_model``."""
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)


def merge_adapter(
    model_path: str,
    adapter_path: str | os.PathLike,
    out_path: str | os.PathLike,
    family: str | None = None,
) -> Path:
    """Merge an adapter into its base model and save full weights (+ processor) to ``out_path``.

    ``family`` (``train.family``) is checked against the model; None infers it.
    """
    fam = families.resolve(model_path, family, "train.family")
    base = families.load_model(model_path, fam, torch.float32)
    merged = load_adapter(base, adapter_path).merge_and_unload()
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    _copy_processor_files(model_path, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _copy_processor_files(model_path: str, out: Path) -> None:
    """Copy tokenizer / processor / chat-template files next to merged weights."""
    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin", ".pt"))
            and (f.name != "config.json" and f.name != "generation_config.json")
        ):
            shutil.copy2(f, out / f.name)
