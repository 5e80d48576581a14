"""Typed configuration: one dataclass per stage, composed into :class:`PipelineConfig`.

Configs load from YAML, then dotted command-line overrides are applied::

    cfg = load_config("configs/demo-cpu.yaml", ["train.lora.r=16", "prepare.seed=7"])

Unknown keys, values of the wrong type and values out of range raise :class:`ConfigError` naming
the full dotted key (``train.learning_rate: must be > 0, got -1.0``). Override values are parsed as
YAML scalars/lists (``a.b=[1,2]``, ``a.c=null``).

Ranges are checked at load time by each dataclass's ``__post_init__``; :func:`validate_models`
checks that the models the configured stages use exist (tiny/packaged names, local folders, or
hub ids already in the local Hugging Face cache) without loading anything.
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
    """A configuration value is unknown, missing, of the wrong type or out of range.

    Errors raised by a dataclass's ``__post_init__`` start with the field's own name
    (``learning_rate: must be > 0, got -1.0``); loading prefixes the section's dotted path, so the
    final message names the full key once (``train.learning_rate: ...``).
    """


KNOWN_BASELINES = ("popularity", "sasrec", "zero_shot", "random")
"""Methods ``evaluate.baselines`` may name (the fine-tuned recommender always runs)."""

VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""Values of ``EngineConfig.dtype`` (vLLM's ``dtype`` argument)."""

RAY_MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024
"""Ray refuses a smaller object store (``ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES``)."""


# --------------------------------------------------------------------------- range checks
# Each check reads fields of ``obj`` by name and raises ``ConfigError("<name>: must be <rule>, got
# <value>")``. None passes (Optional fields); NaN fails every range.


def _bad(name: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}: must be {rule}, got {value!r}")


def _at_least(obj: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= minimum:
            raise _bad(name, f">= {minimum}", value)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise _bad(name, "> 0", value)


def _in_range(obj: Any, name: str, lo: float, hi: float, interval: str = "[]") -> None:
    """``interval`` is the bracket pair: ``[]`` closed, ``(]`` / ``[)`` half-open."""
    value = getattr(obj, name)
    if value is None:
        return
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[1] == ")" else value <= hi
    if not (above and below):
        raise _bad(name, f"in {interval[0]}{lo}, {hi}{interval[1]}", value)


def _minus_one_or_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value != -1 and not value >= 1:
            raise _bad(name, "-1 or >= 1", value)


def _non_empty(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value:
            raise _bad(name, "non-empty", value)


def _whole_above_one(obj: Any, name: str) -> None:
    """Ray resource quantities above 1 must be whole numbers (fractions only below 1)."""
    value = getattr(obj, name)
    if value > 1 and value != int(value):
        raise _bad(name, "<= 1 or a whole number (Ray shares only fractions of one unit)", value)


def _custom_resources(obj: Any, name: str) -> None:
    """Custom Ray resources: names other than CPU/GPU/memory (set those with their own keys),
    amounts >= 0."""
    value = getattr(obj, name)
    for key, amount in value.items():
        if key in ("CPU", "GPU", "memory", "object_store_memory") or not key:
            raise _bad(name, "custom resource names (CPU and GPU have their own keys)", value)
        if not amount >= 0:
            raise _bad(name, "amounts >= 0", value)


def _known_family(obj: Any, name: str = "family") -> None:
    from mllm_msr.families import FAMILIES  # stdlib-only module; imported late (no cycle)

    value = getattr(obj, name)
    if value not in FAMILIES:
        raise ConfigError(f"{name}: {value!r} is not a known family; known: {sorted(FAMILIES)}")


# --------------------------------------------------------------------------- engine / model


@dataclass
class EngineConfig:
    """Settings of one vLLM engine (owned by one Ray actor)."""

    model: str = "tiny:qwen2-vl"
    """Model path, or ``tiny:<name>`` for an offline tiny model built by :mod:`mllm_msr.tiny`."""
    family: str = "qwen2_vl"
    """Model family: a key of :data:`mllm_msr.families.FAMILIES`."""
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
    cpu_threads: int = 0
    """OpenMP/torch threads of the engine on a host without a GPU. 0: the CPUs the process was
    given, i.e. ``OMP_NUM_THREADS`` when set (Ray sets it to an actor's ``pool.num_cpus``:
    one thread for the default pool), else every core the process may run on. A Ray actor and
    a plain process therefore differ unless this is set (DESIGN.md section 4). Speed only."""
    seed: int = 0
    enable_lora: bool = False
    """Allow LoRA adapters per request (``VLLMEngine.score_yes_no(..., lora_path=...)``)."""
    max_lora_rank: int = 16
    """Largest LoRA rank the engine accepts (must be >= the adapter's r)."""
    max_loras: int = 1
    """LoRA adapters resident at once."""

    def __post_init__(self) -> None:
        _non_empty(self, "model")
        _known_family(self)
        if self.dtype not in VLLM_DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {list(VLLM_DTYPES)}")
        _at_least(
            self,
            1,
            "max_model_len",
            "max_num_seqs",
            "tensor_parallel_size",
            "limit_images_per_prompt",
            "image_max_pixels",
            "cpu_kvcache_space_gib",
            "max_lora_rank",
            "max_loras",
        )
        _in_range(self, "gpu_memory_utilization", 0, 1, "(]")
        _at_least(self, 0, "seed", "cpu_threads")


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

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_new_tokens")
        _at_least(self, 0, "temperature", "seed")
        _in_range(self, "top_p", 0, 1, "(]")
        _positive(self, "repetition_penalty")


@dataclass
class ActorPoolConfig:
    """How a Ray Data stage maps engine actors over its input."""

    concurrency: int = 1
    """Number of actors (each owns one engine)."""
    num_gpus: float = 0.0
    """GPUs per actor (set to tensor_parallel_size on GPU clusters)."""
    num_cpus: float = 1.0
    batch_size: int = 16
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor asks for (placement: ``{summarizer: 1}`` runs the actors
    only on nodes started with that resource; speed only, not in the stage's fingerprint)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "concurrency", "batch_size")
        _at_least(self, 0, "num_gpus", "num_cpus")
        _whole_above_one(self, "num_gpus")
        _custom_resources(self, "resources")


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
    """JPEG quality, 1 (worst) to 100."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_side", "max_bytes", "max_pixels")
        _in_range(self, "quality", 1, 100)


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

    def __post_init__(self) -> None:
        _positive(self, "http_timeout_s")
        _at_least(self, 0, "http_retries", "demo_seed")
        _at_least(
            self,
            1,
            "http_concurrency",
            "demo_users",
            "demo_items",
            "num_shards",
            "max_images_per_item",
            "demo_block_users",
        )
        _non_empty(self, "image_extensions")
        for ext in self.image_extensions:
            if not (ext.startswith(".") and len(ext) > 1):
                raise _bad("image_extensions", 'extensions like ".jpg"', ext)


@dataclass
class PrepareConfig:
    user_core: int = 6
    item_core: int = 5
    max_history: Optional[int] = None
    """At most this many of the most recent items before the target form the history; None
    (the paper's protocol): every item before the target, which the recurrent preference
    summarizer reads block by block."""
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
        r = self.split_ratios
        if len(r) != 3 or not all(0 <= x <= 1 for x in r) or not abs(sum(r) - 1.0) <= 1e-6:
            raise _bad("split_ratios", "three numbers in [0, 1] summing to 1", r)
        bad = sorted(set(self.max_users) - {"train", "val", "test"})
        if bad:
            raise ConfigError(f"max_users: unknown split(s) {bad}; use train, val, test")
        if self.max_users and self.split != "user":
            raise ConfigError(f"max_users: needs split: user, got split: {self.split}")
        for split, n in self.max_users.items():
            if not n >= 1:
                raise _bad(f"max_users.{split}", ">= 1", n)
        if not self.user_core >= 2:
            raise _bad("user_core", ">= 2 (a target and a history)", self.user_core)
        _at_least(
            self, 1, "item_core", "max_history", "train_negatives", "eval_negatives", "num_blocks"
        )
        _at_least(self, 0, "seed")


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
    feeding: Literal["continuous", "rounds"] = "continuous"
    """How a batch's recurrence feeds the engine: ``continuous`` queues a user's next block as
    soon as their previous one finishes (the running batch stays full); ``rounds`` sends block
    r of every user as one synchronous call (the reference). Speed only: not in the stage's
    fingerprint (texts are equal under greedy decoding in float32, see the stage's docs)."""
    max_in_flight: int = 0
    """With continuous feeding, at most this many requests in the engine at once (0: one per
    user of the batch, i.e. up to ``pool.batch_size``). Speed only."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "block_size")
        _at_least(self, 0, "max_in_flight")
        _non_empty(self, "noun")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    train_vision: bool = False
    """Also adapt the vision tower and projector (frozen by default)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "r", "alpha")
        _in_range(self, "dropout", 0, 1, "[)")
        _non_empty(self, "target_modules")
        if not all(self.target_modules):
            raise _bad("target_modules", "non-empty module names", self.target_modules)


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

    def __post_init__(self) -> None:
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"offload_params: needs stage: 3, got stage: {self.stage}")
        _at_least(self, 0, "persistence_threshold")


@dataclass
class TrainConfig:
    model: str = "tiny:qwen2-vl"
    family: str = "qwen2_vl"
    multimodal: bool = True
    """Give the candidate's image to the recommender (false: text-only, TALLRec-like)."""
    prompt: Literal["paper", "summary", "history"] = "summary"
    """The recommender prompt (training and scoring alike, :func:`mllm_msr.prompts.
    recommender_chat`): ``paper`` = preference + candidate title + image (the paper's input);
    ``summary`` = also the candidate's generated summary; ``history`` = ``paper`` plus the
    titles of the user's ``prompt_history`` most recent items (TALLRec-style)."""
    prompt_history: int = 5
    """History titles the ``history`` prompt lists (the most recent ones)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each train worker asks for (placement, e.g. ``{trainer: 1}``)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    grad_accum_steps: int = 4
    """Effective batch = micro_batch_size * grad_accum_steps * num_workers (paper: 8)."""
    epochs: int = 1
    max_steps: int = -1
    """Optimizer steps; -1 = run the epochs."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay over the run's steps after the warmup (``transformers.get_scheduler``)."""
    warmup_ratio: float = 0.0
    """Fraction of the run's optimizer steps with a linear warmup from 0."""
    eval_every: int = 0
    """Validate (loss and AUC on the 1:1 validation set, ``eval_samples`` rows) every this many
    optimizer steps; 0: at the end of every epoch. Training always ends with a validation."""
    select_best: bool = False
    """Export the adapter of the validation with the best AUC instead of the last weights."""
    early_stopping_patience: int = 0
    """Stop after this many validations without a better AUC; 0: never."""
    length_bucket: int = 1
    """Pool this many micro-batches, sort the pool by prompt length and cut it again, so that
    rows of one micro-batch have similar lengths (less padding); 1: the shuffled order."""
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
    """Validation rows (at most; one positive and one sampled negative per validation user)
    for the validation loss and AUC; 0 disables validation."""
    missing_preference: Literal["titles", "quarantine"] = "titles"
    """Users without a final preference: use their history's titles as the preference text
    (counted as ``fallback_users``), or quarantine their samples."""

    def __post_init__(self) -> None:
        _non_empty(self, "model")
        _known_family(self)
        _at_least(
            self,
            1,
            "num_workers",
            "micro_batch_size",
            "grad_accum_steps",
            "epochs",
            "max_length",
            "image_size",
            "checkpoint_every",
            "checkpoints_to_keep",
            "log_every",
            "prompt_history",
            "length_bucket",
        )
        _in_range(self, "warmup_ratio", 0, 1, "[)")
        _at_least(self, 0, "eval_every", "early_stopping_patience")
        if (self.select_best or self.early_stopping_patience) and not self.eval_samples:
            raise ConfigError(
                "eval_samples: select_best and early_stopping_patience need validation rows, "
                "got eval_samples: 0"
            )
        _minus_one_or_positive(self, "max_steps")
        _at_least(self, 0, "cpus_per_worker", "weight_decay", "grad_clip", "seed", "eval_samples")
        _whole_above_one(self, "cpus_per_worker")
        _custom_resources(self, "resources_per_worker")
        _positive(self, "learning_rate")
        if not self.max_failures >= -1:
            raise _bad("max_failures", ">= -1 (-1: retry forever)", self.max_failures)


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
    user_sensitivity: bool = True
    """Also score the model methods with each user's preference swapped for another test
    user's (a seeded derangement) and report own - swapped with a paired bootstrap interval
    (``metrics.json`` ``user_sensitivity``): about 0 for a model that ignores its user. Doubles
    the model scoring time."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """What scores the recommender: a transformers forward pass (any family), or vLLM
    (text-only recommenders; fed the collator's token ids, fp32, LoRA per request, prefix
    caching across a user's candidates)."""
    vllm_max_num_seqs: int = 64
    """``evaluate.engine: vllm``: sequences vLLM schedules at once."""
    vllm_kvcache_gib: int = 2
    """``evaluate.engine: vllm`` on CPU: KV cache size (``VLLM_CPU_KVCACHE_SPACE``)."""
    share_prefix: bool = False
    """Text-only recommenders: run the prompt prefix a user's candidates share once and score
    them from its KV cache (same scores up to float rounding; set ``pool.batch_size`` to a
    multiple of the candidates per user so that users are not split across batches)."""

    def __post_init__(self) -> None:
        if not self.ks or not all(k >= 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise _bad("ks", "a non-empty list of distinct ks, each >= 1", self.ks)
        unknown = [b for b in self.baselines if b not in KNOWN_BASELINES]
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown}; known: {list(KNOWN_BASELINES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise _bad("baselines", "distinct", self.baselines)
        _minus_one_or_positive(self, "max_users")
        _at_least(self, 1, "vllm_max_num_seqs", "vllm_kvcache_gib")


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray address; None starts an embedded local Ray (``RAY_ADDRESS`` also works)."""
    num_cpus: Optional[int] = None
    object_store_memory: Optional[int] = 1_000_000_000
    """Bytes; None lets Ray choose."""

    def __post_init__(self) -> None:
        _non_empty(self, "address")
        _at_least(self, 1, "num_cpus")
        _at_least(self, RAY_MIN_OBJECT_STORE_BYTES, "object_store_memory")


@dataclass
class PipelineConfig:
    name: str = "demo"
    run_dir: str = "runs/demo"
    """Local path or pyarrow filesystem URI (``s3://bucket/run``)."""
    run_dir_shared: bool = False
    """A local-path ``run_dir`` is a mount that every Ray node shares (NFS, EFS). Without it a
    local path on a cluster of several nodes is refused (the other nodes cannot see it)."""
    cache_dir: str = ".cache/mllm_msr"
    """Where tiny models and compiled artifacts are cached."""
    seed: int = 0
    check_models: bool = True
    """Before Ray starts, check that every model a stage about to run loads exists locally
    (:func:`validate_models`). Set false where the driver does not hold the weights that the
    workers do (a cluster head node without the models)."""
    no_progress_timeout_s: float = 1800.0
    """A stage whose outputs and progress do not move for this long fails, naming the stage
    (0 disables). Long enough for a slow engine start or a large checkpoint."""
    hf_hub_offline: bool = True
    """``HF_HUB_OFFLINE`` on every Ray worker: true (the demo, tests) never downloads at run time;
    false lets nodes fetch hub models they lack (GPU clusters whose nodes start empty). The
    variable set in the driver's environment wins."""
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
        if not self.stages or len(set(self.stages)) != len(self.stages):
            raise _bad("stages", "a non-empty list of distinct stages", self.stages)
        _non_empty(self, "name", "run_dir", "cache_dir")
        _at_least(self, 0, "seed")
        _at_least(self, 0, "no_progress_timeout_s")


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
    except ConfigError as exc:  # the message starts with the field name: prefix the section
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


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


# --------------------------------------------------------------------------- models


def models_in_use(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """``(dotted key, model spec, family)`` of each model a stage in ``cfg.stages`` loads.

    ``item_summaries`` loads its engine's model when enabled; ``user_preferences`` its engine's;
    ``train`` the recommender ``train.model``, which ``evaluate`` also loads for ``zero_shot``
    (its ``fine_tuned`` method runs only after ``train``).
    """
    used = []
    if "item_summaries" in cfg.stages and cfg.item_summaries.enabled:
        engine = cfg.item_summaries.engine
        used.append(("item_summaries.engine", engine.model, engine.family))
    if "user_preferences" in cfg.stages:
        engine = cfg.user_preferences.engine
        used.append(("user_preferences.engine", engine.model, engine.family))
    if "train" in cfg.stages or (
        "evaluate" in cfg.stages and "zero_shot" in cfg.evaluate.baselines
    ):
        used.append(("train", cfg.train.model, cfg.train.family))
    return [(f"{section}.model", model, family) for section, model, family in used]


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub model ``repo_id`` has a ``config.json`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # HFValidationError: not a valid repo id (a path, say)
        return False
    return isinstance(found, str)  # None: never fetched; a sentinel: known to be absent


def check_model(key: str, spec: str, family: str | None = None) -> None:
    """Check that the model ``spec`` (the value of the config key ``key``) can be loaded offline.

    ``tiny:<name>`` must name a tiny model (:data:`mllm_msr.tiny.TINY_SPECS`; nothing is built),
    ``pkg:<name>`` a packaged model whose package is installed (:mod:`mllm_msr.models`); any other
    spec must be an existing local directory or a hub id already in the local Hugging Face
    cache (runs never download). With ``family``, a tiny or packaged model must be of that
    family. Imports neither torch, vLLM nor Ray. Raises :class:`ConfigError` naming ``key``.
    """
    from mllm_msr import models, tiny

    family_key = key.rsplit(".", 1)[0] + ".family" if "." in key else "family"
    if spec.startswith(tiny.TINY_PREFIX):
        name = spec[len(tiny.TINY_PREFIX) :]
        if name not in tiny.TINY_SPECS:
            known = sorted(tiny.TINY_PREFIX + n for n in tiny.TINY_SPECS)
            raise ConfigError(f"{key}: {spec!r} is not a known tiny model; known: {known}")
        built = tiny.TINY_SPECS[name].family
    elif spec.startswith(models.PACKAGED_PREFIX):
        name = spec[len(models.PACKAGED_PREFIX) :]
        if name not in models.PACKAGED_MODELS:
            known = sorted(models.PACKAGED_PREFIX + n for n in models.PACKAGED_MODELS)
            raise ConfigError(f"{key}: {spec!r} is not a known packaged model; known: {known}")
        try:
            models.gguf_path(models.PACKAGED_MODELS[name])
        except models.MissingModelPackageError as exc:
            raise ConfigError(f"{key}: {spec!r}: {exc}") from None
        built = models.PACKAGED_MODELS[name].family
    elif "://" in spec and not spec.startswith("file://"):  # synced on each node's first use
        from mllm_msr.model_source import read_manifest

        try:
            read_manifest(spec)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return
    else:
        path = Path(spec)
        if path.is_dir() or _in_hub_cache(spec):
            if family is not None:
                _check_model_type(key, family_key, spec, family)
            return
        where = f"no local directory {str(path.absolute())!r}"
        if not (path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1):
            from huggingface_hub import constants

            where += (
                f" and no hub id {spec!r} in the local Hugging Face cache "
                f"{constants.HF_HUB_CACHE!r}"
            )
        raise ConfigError(
            f"{key}: model {spec!r} not found: {where} (runs never download: give a model "
            f"folder, fetch the hub model into that cache first, or use tiny:<name> / pkg:<name>)"
        )
    if family is not None and family != built:
        raise ConfigError(
            f"{family_key}: {spec!r} ({key}) is a {built!r} model, got family {family!r}"
        )


def _model_type(spec: str) -> str | None:
    """``model_type`` of a local model folder or a cached hub model (None when unknown)."""
    import json

    path = Path(spec) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(spec, "config.json")
        except ValueError:
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _check_model_type(key: str, family_key: str, spec: str, family: str) -> None:
    """A model's ``config.json`` ``model_type`` must be one of its family's (the registry)."""
    from mllm_msr.families import family as lookup

    model_type = _model_type(spec)
    expected = lookup(family).model_types
    if model_type is not None and expected and model_type not in expected:
        raise ConfigError(
            f"{family_key}: {spec!r} ({key}) is a {model_type!r} model; family {family!r} "
            f"expects model_type {' or '.join(expected)} (mllm_msr/families.py)"
        )


def validate_models(cfg: PipelineConfig) -> None:
    """Check every model the configured stages load (:func:`models_in_use`, :func:`check_model`).

    Fast and side-effect free (no torch, vLLM or Ray; nothing built or downloaded): call it
    before Ray starts. Raises :class:`ConfigError` on the first missing model. With
    ``hf_hub_offline`` false, hub ids are not checked (the nodes download them).
    """
    for key, spec, family in models_in_use(cfg):
        if not cfg.hf_hub_offline and _is_hub_id(spec):
            continue  # nodes download it on first use
        check_model(key, spec, family)


def _is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a tiny / packaged model nor an existing local path."""
    return (
        ":" not in spec
        and spec.count("/") == 1
        and not spec.startswith((".", "/", "~"))
        and not Path(spec).exists()
    )


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
