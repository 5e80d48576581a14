"""The stage contract: what each stage reads, writes and depends on, and its fingerprint.

Every stage declares

* ``inputs``: the stages whose outputs it reads;
* ``outputs``: the tables and files it owns under the run directory (their files are recorded,
  with size, SHA-256 and row count, in the stage's completion record and verified on a rerun);
  ``scratch``: what it owns but that is not verified (Ray Train checkpoints);
* ``config``: the dotted config keys (or sections) that shape its output, minus ``ignore``
  (parallelism, logging: settings that change how fast, not what);
* ``prompts``: the prompt templates it renders (:data:`mllm_msr.prompts.PROMPT_VERSIONS`);
* ``code_version``: bumped by hand when the stage's output for the same inputs changes.

The **fingerprint** of a stage is a hash of its config values, its inputs' fingerprints, its
prompt versions and its code version. The pipeline (:mod:`mllm_msr.pipeline`) owns skip /
rerun: a stage whose recorded fingerprint equals the current one, and whose recorded parts are
intact, is skipped; otherwise it runs, and since fingerprints chain through ``inputs``,
everything downstream runs too. :func:`explain` says why in words (which keys changed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mllm_msr import prompts
from mllm_msr.config import PipelineConfig, to_dict


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    """``module:function`` called as ``function(cfg, run, **kwargs) -> summary``."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    code_version: int = 1
    scratch: tuple[str, ...] = ()
    incremental: bool = False
    """Keeps rows whose keys are current on a rerun (redoes only what changed)."""
    fresh_kwarg: bool = False
    """The entry takes ``fresh=True`` (``--force``: start over instead of resuming)."""

    @property
    def quarantine(self) -> str:
        return f"quarantine/{self.name}"


_POOL = ("pool", "engine.max_num_seqs", "engine.gpu_memory_utilization")
_ENGINE_SPEED = (
    "engine.cpu_kvcache_space_gib",
    "engine.tensor_parallel_size",
    "engine.cpu_threads",
)

RECOMMENDER_TEMPLATES = tuple(prompts.recommender_template(p) for p in prompts.RECOMMENDER_PROMPTS)
"""Every recommender template (``train.prompt`` picks one; ``train.prompt`` is in the config)."""

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "ingest",
            "mllm_msr.stages.ingest:run_ingest",
            inputs=(),
            outputs=("items", "interactions", "quarantine/ingest"),
            config=("ingest",),
            ignore=(
                "ingest.num_shards",
                "ingest.http_concurrency",
                "ingest.demo_block_users",
                "ingest.http_retries",
            ),
        ),
        Stage(
            "prepare",
            "mllm_msr.stages.prepare:run_prepare",
            inputs=("ingest",),
            outputs=("sequences", "candidates", "quarantine/prepare"),
            config=("prepare",),
            ignore=("prepare.num_blocks",),
            code_version=2,
        ),
        Stage(
            "item_summaries",
            "mllm_msr.stages.item_summaries:run_item_summaries",
            inputs=("ingest",),
            outputs=("item_summaries", "quarantine/item_summaries"),
            config=("item_summaries",),
            ignore=tuple(f"item_summaries.{k}" for k in _POOL + _ENGINE_SPEED),
            prompts=("item_summary", "item_fusion", "item_text_summary"),
            incremental=True,
            fresh_kwarg=True,
        ),
        Stage(
            "user_preferences",
            "mllm_msr.stages.user_preferences:run_user_preferences",
            inputs=("prepare", "item_summaries"),
            outputs=("preferences", "quarantine/user_preferences"),
            config=("user_preferences",),
            ignore=tuple(
                f"user_preferences.{k}"
                for k in _POOL + _ENGINE_SPEED + ("feeding", "max_in_flight")
            ),
            prompts=("preference_recurrent", "preference_direct"),
            incremental=True,
            fresh_kwarg=True,
        ),
        Stage(
            "train",
            "mllm_msr.stages.train:run_train",
            inputs=("prepare", "item_summaries", "user_preferences"),
            outputs=("adapter", "merged", "quarantine/train"),
            scratch=("train",),
            config=("train",),
            ignore=(
                "train.log_every",
                "train.checkpoints_to_keep",
                "train.max_failures",
                "train.cpus_per_worker",
                "train.resources_per_worker",
            ),
            prompts=RECOMMENDER_TEMPLATES,
            fresh_kwarg=True,
        ),
        Stage(
            "evaluate",
            "mllm_msr.stages.evaluate:run_evaluate",
            inputs=("prepare", "item_summaries", "user_preferences", "train"),
            outputs=(
                "scores",
                "metrics.json",
                "report.html",
                "model_card.md",
                "quarantine/evaluate",
            ),
            config=(
                "evaluate",
                "seed",
                "train.model",
                "train.family",
                "train.multimodal",
                "train.max_length",
                "train.image_size",
                "train.missing_preference",
                "train.prompt",
                "train.prompt_history",
            ),
            ignore=("evaluate.pool",),
            prompts=RECOMMENDER_TEMPLATES,
        ),
    ]
}
ORDER: list[str] = list(STAGES)


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that reads its outputs, directly or not, in pipeline order."""
    out = {stage}
    for name in ORDER:
        if any(i in out for i in STAGES[name].inputs):
            out.add(name)
    return [s for s in ORDER if s in out]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{dotted.key: leaf}`` (lists are leaves)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The dotted config values that shape ``stage``'s output."""
    spec = STAGES[stage]
    flat = flatten(to_dict(cfg))
    return {
        k: v
        for k, v in sorted(flat.items())
        if _matches(k, spec.config) and not _matches(k, spec.ignore)
    }


def stage_prompts(stage: str) -> dict[str, str]:
    return {p: prompts.prompt_version(p) for p in STAGES[stage].prompts}


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Fingerprint:
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str | None]
    prompts: dict[str, str]
    code_version: int

    @property
    def value(self) -> str:
        return _digest(dataclasses.asdict(self))[:32]

    def record(self) -> dict[str, Any]:
        return {"fingerprint": self.value, **dataclasses.asdict(self)}


def fingerprint(cfg: PipelineConfig, stage: str, inputs: dict[str, str | None]) -> Fingerprint:
    """The fingerprint of ``stage`` under ``cfg``, given its inputs' fingerprints."""
    spec = STAGES[stage]
    return Fingerprint(
        stage=stage,
        config=stage_config(cfg, stage),
        inputs={i: inputs.get(i) for i in spec.inputs},
        prompts=stage_prompts(stage),
        code_version=spec.code_version,
    )


def explain(record: dict | None, fp: Fingerprint, limit: int = 8) -> list[str]:
    """Why ``record`` (a stage's completion record) does not match ``fp``, in words."""
    if record is None:
        return ["not run yet"]
    if "fingerprint" not in record:
        return ["completed by an older version without a fingerprint"]
    if record["fingerprint"] == fp.value:
        return []
    reasons = []
    old, new = record.get("config", {}), fp.config
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")
    )
    for k in changed[:limit]:
        reasons.append(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
    if len(changed) > limit:
        reasons.append(f"... and {len(changed) - limit} more config keys")
    for name, value in fp.inputs.items():
        if record.get("inputs", {}).get(name) != value:
            reasons.append(f"input {name} changed")
    for name, value in fp.prompts.items():
        if record.get("prompts", {}).get(name) != value:
            reasons.append(f"prompt {name}: {record.get('prompts', {}).get(name)} -> {value}")
    if record.get("code_version") != fp.code_version:
        reasons.append(f"code version {record.get('code_version')} -> {fp.code_version}")
    return reasons or ["fingerprint changed"]
