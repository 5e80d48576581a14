"""A portable exported adapter: its ``adapter_config.json`` names the base model by the config's
spec (``tiny:qwen2-vl``, ``pkg:smollm2`` or a hub id), not by the absolute path of the machine
that trained it, and its ``README.md`` is a filled model card (method, base model, data,
training settings and, once evaluated, metrics) instead of peft's empty template.

The train stage calls :func:`finalize_adapter` on the exported folder (no metrics yet); the
evaluate stage writes the card with metrics to ``<run_dir>/model_card.md`` (the adapter folder
is the train stage's recorded output, which a later stage must not change).

Loading needs no path from the adapter: the project's scoring and serving load the base model
by ``train.model`` (resolved with :func:`mllm_msr.tiny.resolve_model`) and put the adapter on
it (:func:`mllm_msr.engines.peft.load_adapter`, vLLM ``LoRARequest``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ADAPTER_CONFIG = "adapter_config.json"
CARD = "README.md"


def make_portable(folder: str | Path, base_model: str) -> dict:
    """Set ``base_model_name_or_path`` of ``folder``'s adapter config to ``base_model`` (a
    spec or hub id); returns the updated config."""
    path = Path(folder) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return config


def finalize_adapter(folder: str | Path, cfg, train_summary: Mapping | None = None) -> None:
    """Make the exported adapter folder portable and write its model card (no metrics)."""
    make_portable(folder, cfg.train.model)
    (Path(folder) / CARD).write_text(model_card(cfg, train_summary, None))


def model_card(cfg, train_summary: Mapping | None, metrics: Mapping | None) -> str:
    """The model card (markdown with YAML front matter) of the run's recommender adapter."""
    from mllm_msr.report import format_metrics_table

    t = cfg.train
    s = dict(train_summary or {})
    front = {
        "base_model": t.model,
        "library_name": "peft",
        "pipeline_tag": "image-text-to-text" if t.multimodal else "text-generation",
        "tags": ["lora", "recommendation", "sequential-recommendation", "mllm-msr"],
    }
    effective = t.micro_batch_size * t.grad_accum_steps * t.num_workers
    length = f"{t.max_steps} optimizer steps" if t.max_steps > 0 else f"{t.epochs} epoch(s)"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# MLLM-MSR recommender adapter: {cfg.name}",
        "",
        "A LoRA adapter that turns the base model into the recommender of MLLM-MSR "
        "(Ye et al., *Harnessing Multimodal Large Language Models for Multimodal Sequential "
        "Recommendation*, AAAI 2025). Given a user's preference text (summarized by an LLM "
        "from their interaction history, recurrently, block by block, over per-item image "
        "summaries) and a candidate item"
        + (" (its image and title)" if t.multimodal else " (its title)")
        + ", it answers whether the user will interact with the candidate; the probability of "
        "the answer *yes* is the candidate's score.",
        "",
        "## Base model",
        "",
        f"- `{t.model}` (prompt family `{t.family}`; "
        + ("multimodal" if t.multimodal else "text only")
        + ")",
        "- `tiny:<name>` and `pkg:<name>` are specs of the mllm-msr package: resolve them with "
        "`mllm_msr.tiny.resolve_model(spec)`; anything else is a Hugging Face hub id or a path.",
        "",
        "## Data",
        "",
        f"- run `{cfg.name}`, dataset format `{cfg.ingest.format}`"
        + (f" from `{cfg.ingest.root}`" if cfg.ingest.root else ""),
        f"- prepare seed {cfg.prepare.seed}",
    ]
    if s.get("samples"):
        lines.append(f"- SFT samples per split: {json.dumps(s['samples'], sort_keys=True)}")
    if s.get("fallback_users") is not None:
        lines.append(f"- users without a preference (titles used instead): {s['fallback_users']}")
    lines += [
        "",
        "## Training",
        "",
        f"- LoRA r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout}, targets "
        f"{', '.join(t.lora.target_modules)}; vision tower "
        + ("adapted" if t.lora.train_vision else "frozen"),
        f"- DeepSpeed ZeRO stage {t.zero.stage}, {t.num_workers} worker(s), precision "
        f"{t.precision}, learning rate {t.learning_rate}, weight decay {t.weight_decay}",
        f"- micro batch {t.micro_batch_size} × {t.grad_accum_steps} accumulation × "
        f"{t.num_workers} workers = effective batch {effective}; {length}",
        f"- max length {t.max_length} tokens, image size {t.image_size}, seed {t.seed}",
        f"- recommender prompt `{t.prompt}`"
        + (f" ({t.prompt_history} history titles)" if t.prompt == "history" else ""),
    ]
    if s.get("steps") is not None:
        lines.append(
            f"- trained {s['steps']} steps: loss {s.get('first_loss')} → {s.get('final_loss')}"
            + (f", validation loss {s['val_loss']}" if s.get("val_loss") is not None else "")
            + (f", validation AUC {s['val_auc']}" if s.get("val_auc") is not None else "")
            + (
                f"; exported the weights of step {s['exported_step']} (best validation AUC)"
                if s.get("exported_step") not in (None, s["steps"])
                else ""
            )
        )
    lines += ["", "## Metrics", ""]
    if metrics and metrics.get("methods"):
        ks = metrics.get("ks", [1, 3, 5, 10])
        lines += [
            f"Split `{metrics.get('split')}`, {metrics.get('n_users')} users, values ×100 "
            "(brackets: 95% bootstrap interval over users):",
            "",
            format_metrics_table(
                metrics["methods"],
                metrics=["auc", "uauc", *[f"hr@{k}" for k in ks], *[f"ndcg@{k}" for k in ks]],
                ci=_ci(metrics.get("intervals")),
            ),
        ]
    else:
        lines.append(
            "Not evaluated when this card was written: the evaluate stage writes the metrics "
            "to the run's `metrics.json`, `report.html` and `model_card.md`."
        )
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from mllm_msr.tiny import resolve_model",
        "from mllm_msr.recommender.score import load_recommender",
        "",
        f'model = load_recommender(resolve_model("{t.model}"), "path/to/adapter")',
        "```",
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump({"train": _plain(t)}, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _ci(intervals: Mapping | None) -> dict | None:
    if not intervals:
        return None
    return {m: {k: (v["lo"], v["hi"]) for k, v in ms.items()} for m, ms in intervals.items()}


def _plain(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
