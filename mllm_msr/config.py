"""Typed configuration: one dataclass per stage, composed into :class:`PipelineConfig`.

Configs load from YAML, then dotted command-line overrides are applied::

    cfg = load_config("configs/demo-cpu.yaml", ["train.lora.r=16", "prepare.seed=7"])

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the full dotted key.
Override values are parsed as YAML scalars/lists (``a.b=[1,2]``, ``a.c=null``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


# --------------------------------------------------------------------------- engine / model


@dataclass
class EngineConfig:
    """Settings of one vLLM engine (owned by one Ray actor)."""

    model: str = "tiny:qwen2-vl"
    """Model path, or ``tiny:<name>`` for an offline tiny model built by :mod:`mllm_msr.tiny`."""
    family: str = "qwen2_vl"
    """Prompt/chat family: a key of :data:`mllm_msr.prompts.FAMILIES`."""
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    enforce_eager: bool = True
    """Eager mode. Required on CPU (compiled bf16 gives wrong text there)."""
    enable_prefix_caching: bool = True
    limit_images_per_prompt: int = 1
    image_max_pixels: Optional[int] = None
    """Upper bound on pixels per image given to the processor (fixed resolution when set)."""
    cpu_kvcache_space_gib: int = 1
    """KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``); ignored on GPU."""
    seed: int = 0
    enable_lora: bool = False
    """Allow LoRA adapters per request (``VLLMEngine.score_yes_no(..., lora_path=...)``)."""
    max_lora_rank: int = 16
    """Largest LoRA rank the engine accepts (must be >= the adapter's r)."""
    max_loras: int = 1
    """LoRA adapters resident at once."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")


@dataclass
class SamplingConfig:
    """Generation settings. ``temperature=0`` is greedy (the paper's setting)."""

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    """vLLM's repetition penalty (1.0: none). Small models decoding greedily loop on one
    sentence; ~1.2 stops that (see configs/microlens-50k-smollm2.yaml)."""


@dataclass
class ActorPoolConfig:
    """How a Ray Data stage maps engine actors over its input."""

    concurrency: int = 1
    """Number of actors (each owns one engine)."""
    num_gpus: float = 0.0
    """GPUs per actor (set to tensor_parallel_size on GPU clusters)."""
    num_cpus: float = 1.0
    batch_size: int = 16


# --------------------------------------------------------------------------- stages


@dataclass
class ImageConfig:
    max_side: int = 448
    """Images are resized so that their longest side is at most this many pixels."""
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    """Decoded size above which an image is refused as a decompression bomb."""
    format: Literal["JPEG", "PNG"] = "JPEG"
    quality: int = 90


@dataclass
class IngestConfig:
    format: Literal["demo", "microlens", "amazon", "generic"] = "demo"
    root: Optional[str] = None
    """Dataset folder (microlens / amazon / generic formats)."""
    interactions: Optional[str] = None
    """Interactions file, relative to ``root`` unless absolute."""
    items: Optional[str] = None
    """Items/titles/metadata file, relative to ``root`` unless absolute."""
    image_dir: Optional[str] = None
    """Folder of images named by item id (microlens / generic)."""
    image_url_column: Optional[str] = None
    require_images: bool = False
    """Quarantine items without a usable image instead of keeping them text-only."""
    require_text: bool = True
    images: ImageConfig = field(default_factory=ImageConfig)
    http_timeout_s: float = 10.0
    http_retries: int = 2
    http_concurrency: int = 8
    http_deadline_s: float = 30.0
    """Wall-clock limit of one image URL fetch: DNS, connects, redirects, retries and the body
    together (``http_timeout_s`` only bounds each socket operation, which a server sending a byte
    at a time never trips). A fetch cut by it is quarantined as ``fetch_timeout``."""
    http_allow_hosts: list[str] = field(default_factory=list)
    """Host names (``images.internal``, ``localhost``) or IP networks (``127.0.0.1``,
    ``10.0.0.0/8``) that image URLs may reach although they are not public. Empty (the default):
    a URL or redirect whose host resolves to a loopback, private, link-local, multicast, reserved
    or otherwise non-global address is quarantined as ``blocked_address``."""
    demo_users: int = 300
    demo_items: int = 120
    demo_seed: int = 0
    num_shards: int = 4
    """Minimum number of blocks the inputs are read / generated in (parallelism, output files)."""
    user_column: Optional[str] = None
    """Interactions column holding the user id (generic/microlens CSV; default: user_id, user)."""
    item_column: Optional[str] = None
    """Column holding the item id in both files (default: item_id, item, parent_asin)."""
    timestamp_column: Optional[str] = None
    """Interactions timestamp column (default: timestamp, time, ts)."""
    timestamp_unit: Literal["s", "ms"] = "s"
    """Unit of the generic interactions' timestamps; stored in seconds."""
    title_column: Optional[str] = None
    """Items title column (default: title)."""
    text_column: Optional[str] = None
    """Items description column (default: text, description; optional)."""
    image_column: Optional[str] = None
    """Items column of image paths relative to ``image_dir`` or ``root`` ("|"-separated or a list)."""
    max_images_per_item: int = 4
    """Images kept per item (the first ones; each is summarized, then fused)."""
    image_extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp"])
    """Extensions tried for images named by item id in ``image_dir``."""
    demo_block_users: int = 2000
    """Users per generated block of the demo interactions (bounds the memory of one task)."""


@dataclass
class PrepareConfig:
    user_core: int = 6
    item_core: int = 5
    max_history: int = 10
    """The most recent items before the target that form the history."""
    split: Literal["user", "leave_one_out"] = "user"
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    train_negatives: int = 1
    eval_negatives: int = 20
    seed: int = 42
    num_blocks: int = 4
    """Blocks the users are processed in (outputs do not depend on it)."""
    max_users: dict[str, int] = field(default_factory=dict)
    """Per split (``train``/``val``/``test``), keep at most this many users: a seeded sample
    drawn after the split of *all* users, so the split and each kept user's candidates do not
    depend on it (a smaller run scores a subset of the full run's rows). Empty: every user.
    User split only; for compute-bounded runs (e.g. an LLM on a CPU)."""

    def __post_init__(self) -> None:
        if len(self.split_ratios) != 3 or abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ConfigError("prepare.split_ratios must be three numbers summing to 1")
        bad = sorted(set(self.max_users) - {"train", "val", "test"})
        if bad:
            raise ConfigError(f"prepare.max_users: unknown split(s) {bad}; use train, val, test")
        if self.max_users and self.split != "user":
            raise ConfigError("prepare.max_users needs split: user")
        if any(n < 1 for n in self.max_users.values()):
            raise ConfigError("prepare.max_users values must be >= 1")
        if self.user_core < 2:
            raise ConfigError("prepare.user_core must be >= 2 (a target and a history)")


@dataclass
class ItemSummariesConfig:
    enabled: bool = True
    """When false, item summaries are the item titles (the "no image summaries" ablation)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    multi_image: Literal["first", "per_image_fusion"] = "per_image_fusion"


@dataclass
class UserPreferencesConfig:
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(model="tiny:qwen2", family="qwen2")
    )
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=96))
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=64))
    mode: Literal["recurrent", "direct"] = "recurrent"
    """``direct`` is the paper's no-recurrence ablation (whole history in one prompt)."""
    block_size: int = 3
    use_item_summaries: bool = True
    """When false, blocks show titles only (the paper's no-image-summary ablation)."""
    missing_summary: Literal["title", "quarantine"] = "title"
    """History items without a summary: show the title only (counted), or quarantine the user."""
    noun: str = "item"
    """What the prompts call an item ("video" for MicroLens, "product" for Amazon)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    train_vision: bool = False
    """Also adapt the vision tower and projector (frozen by default)."""


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    """Keep optimizer state on CPU and step there (DeepSpeed's compiled CPU Adam)."""
    offload_params: bool = False
    """ZeRO-3 only: keep partitioned parameters on CPU."""
    persistence_threshold: Optional[int] = None
    """ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's
    ``stage3_param_persistence_threshold``; None keeps its default, 1e5). 0 partitions all."""


@dataclass
class TrainConfig:
    model: str = "tiny:qwen2-vl"
    family: str = "qwen2_vl"
    multimodal: bool = True
    """Give the candidate's image to the recommender (false: text-only, TALLRec-like)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    grad_accum_steps: int = 4
    """Effective batch = micro_batch_size * grad_accum_steps * num_workers (paper: 8)."""
    epochs: int = 1
    max_steps: int = -1
    """Optimizer steps; -1 = run the epochs."""
    max_length: int = 512
    image_size: int = 224
    """Fixed square resolution images are resized to for the recommender."""
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    max_failures: int = 1
    seed: int = 0
    merge_adapter: bool = False
    """Also export merged full weights next to the adapter."""
    checkpoints_to_keep: int = 2
    """Ray Train checkpoints kept in ``<run_dir>/train/`` (older ones are deleted)."""
    log_every: int = 10
    """Report the training loss to Ray Train every this many optimizer steps."""
    eval_samples: int = 256
    """Validation samples (at most) whose mean loss is computed at the end; 0 disables."""
    missing_preference: Literal["titles", "quarantine"] = "titles"
    """Users without a final preference: use their history's titles as the preference text
    (counted as ``fallback_users``), or quarantine their samples."""

    def __post_init__(self) -> None:
        for name in (
            "num_workers",
            "micro_batch_size",
            "grad_accum_steps",
            "checkpoint_every",
            "checkpoints_to_keep",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.max_failures < -1:
            raise ConfigError("train.max_failures must be >= -1 (-1: retry forever)")


@dataclass
class EvaluateConfig:
    split: Literal["test", "val"] = "test"
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=32))
    baselines: list[str] = field(default_factory=lambda: ["popularity", "zero_shot"])
    max_users: int = -1
    """Score only this many users (-1: the whole split, as the protocol requires)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 by default: bf16 scores collapse into ties."""
    share_prefix: bool = False
    """Text-only recommenders: run the prompt prefix a user's candidates share once and score
    them from its KV cache (same scores up to float rounding; set ``pool.batch_size`` to a
    multiple of the candidates per user so that users are not split across batches)."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray address; None starts an embedded local Ray (``RAY_ADDRESS`` also works)."""
    num_cpus: Optional[int] = None
    object_store_memory: Optional[int] = 1_000_000_000


@dataclass
class PipelineConfig:
    name: str = "demo"
    run_dir: str = "runs/demo"
    """Local path or pyarrow filesystem URI (``s3://bucket/run``)."""
    cache_dir: str = ".cache/mllm_msr"
    """Where tiny models and compiled artifacts are cached."""
    seed: int = 0
    stages: list[str] = field(
        default_factory=lambda: [
            "ingest",
            "prepare",
            "item_summaries",
            "user_preferences",
            "train",
            "evaluate",
        ]
    )
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    item_summaries: ItemSummariesConfig = field(default_factory=ItemSummariesConfig)
    user_preferences: UserPreferencesConfig = field(default_factory=UserPreferencesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        known = {
            "ingest",
            "prepare",
            "item_summaries",
            "user_preferences",
            "train",
            "evaluate",
        }
        bad = [s for s in self.stages if s not in known]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; known: {sorted(known)}")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} fits no type of {tp}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + str(u) for u in unknown)}; "
            f"known keys{' of ' + prefix if prefix else ''}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to a nested dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict, overrides: list[str] | None = None) -> PipelineConfig:
    data = dict(data or {})
    for ov in overrides or []:
        apply_override(data, ov)
    return _build(PipelineConfig, data)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a pipeline config from YAML (or defaults when ``path`` is None) plus overrides."""
    data: dict = {}
    if path is not None:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(data, overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
