"""Typed configuration: every shipped config loads; unknown keys and wrong types fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_msr.config import ConfigError, PipelineConfig, config_from_dict, dump_yaml, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "paper-llava.yaml", "qwen2.5-vl.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    again = config_from_dict(__import__("yaml").safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_paper_config_has_paper_hyperparameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper-llava.yaml")
    t = cfg.train
    assert (t.lora.r, t.learning_rate) == (8, 2e-5)
    # The paper's max_length 512 cannot hold one LLaVA-v1.6 image (1176 tokens, any size):
    # the config deviates so that training runs (tests/test_families.py checks the refusal).
    assert t.max_length == 2048
    assert t.micro_batch_size * t.grad_accum_steps * t.num_workers == 8
    assert cfg.user_preferences.block_size == 3
    assert cfg.item_summaries.sampling.max_new_tokens == 200
    assert cfg.item_summaries.sampling.temperature == 0.0
    assert (cfg.prepare.user_core, cfg.prepare.item_core) == (6, 5)
    assert (cfg.prepare.train_negatives, cfg.prepare.eval_negatives) == (1, 20)


def test_dotted_overrides_apply_with_types():
    cfg = load_config(
        None,
        [
            "train.lora.r=16",
            "prepare.seed=7",
            "evaluate.ks=[1,5]",
            "ray.address=null",
            "train.learning_rate=1e-4",
            "item_summaries.engine.model=/models/x",
        ],
    )
    assert cfg.train.lora.r == 16
    assert cfg.prepare.seed == 7
    assert cfg.evaluate.ks == [1, 5]
    assert cfg.ray.address is None
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.item_summaries.engine.model == "/models/x"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lora.rank=8", "train.lora.rank"),
        ("trian.epochs=1", "trian"),
        ("train.lora.r=eight", "train.lora.r"),
        ("train.use_gpu=3", "train.use_gpu"),
        ("prepare.split=random", "prepare.split"),
        ("evaluate.ks=[1,x]", "evaluate.ks[1]"),
        ("train.zero.stage=4", "train.zero.stage"),
        ("train.lora=3", "train.lora"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lora:\n    r: 8\n    alfa: 3\n")
    with pytest.raises(ConfigError, match=r"train\.lora\.alfa"):
        load_config(p)


def test_validation_in_post_init():
    with pytest.raises(ConfigError, match="split_ratios"):
        load_config(None, ["prepare.split_ratios=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["stages=[ingest,bake]"])


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "override, key",
    [
        # the values named in issue 13
        ("train.learning_rate=-1", "train.learning_rate"),
        ("prepare.split_ratios=[1.5,-0.5,0]", "prepare.split_ratios"),
        ("user_preferences.block_size=0", "user_preferences.block_size"),
        ("evaluate.ks=[0]", "evaluate.ks"),
        ("evaluate.baselines=[bogus]", "evaluate.baselines"),
        # more, one per kind of rule and section
        ("evaluate.ks=[]", "evaluate.ks"),
        ("evaluate.ks=[1,1]", "evaluate.ks"),
        ("evaluate.max_users=0", "evaluate.max_users"),
        ("evaluate.pool.batch_size=0", "evaluate.pool.batch_size"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.learning_rate=.nan", "train.learning_rate"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.max_steps=-2", "train.max_steps"),
        ("train.epochs=0", "train.epochs"),
        ("train.max_length=0", "train.max_length"),
        ("train.image_size=0", "train.image_size"),
        ("train.eval_samples=-1", "train.eval_samples"),
        ("train.family=qwen9", "train.family"),
        ("train.lora.dropout=1.0", "train.lora.dropout"),
        ("train.lora.r=0", "train.lora.r"),
        ("train.lora.target_modules=[]", "train.lora.target_modules"),
        ("train.zero.offload_params=true", "train.zero.offload_params"),
        ("train.zero.persistence_threshold=-1", "train.zero.persistence_threshold"),
        ("item_summaries.sampling.temperature=-0.5", "item_summaries.sampling.temperature"),
        ("item_summaries.sampling.top_p=0", "item_summaries.sampling.top_p"),
        ("item_summaries.sampling.top_p=1.5", "item_summaries.sampling.top_p"),
        ("item_summaries.sampling.max_new_tokens=0", "item_summaries.sampling.max_new_tokens"),
        (
            "user_preferences.sampling.repetition_penalty=0",
            "user_preferences.sampling.repetition_penalty",
        ),
        ("item_summaries.engine.max_model_len=0", "item_summaries.engine.max_model_len"),
        (
            "item_summaries.engine.tensor_parallel_size=0",
            "item_summaries.engine.tensor_parallel_size",
        ),
        (
            "item_summaries.engine.gpu_memory_utilization=0",
            "item_summaries.engine.gpu_memory_utilization",
        ),
        ("item_summaries.engine.dtype=fp8", "item_summaries.engine.dtype"),
        (
            "user_preferences.engine.cpu_kvcache_space_gib=0",
            "user_preferences.engine.cpu_kvcache_space_gib",
        ),
        ("user_preferences.engine.family=nope", "user_preferences.engine.family"),
        ("item_summaries.pool.concurrency=0", "item_summaries.pool.concurrency"),
        ("item_summaries.pool.num_gpus=-1", "item_summaries.pool.num_gpus"),
        ("item_summaries.pool.num_gpus=1.5", "item_summaries.pool.num_gpus"),
        ("prepare.split_ratios=[0.5,0.5]", "prepare.split_ratios"),
        ("prepare.train_negatives=0", "prepare.train_negatives"),
        ("prepare.eval_negatives=0", "prepare.eval_negatives"),
        ("prepare.num_blocks=0", "prepare.num_blocks"),
        ("prepare.user_core=1", "prepare.user_core"),
        ("prepare.max_users={test: 0}", "prepare.max_users.test"),
        ("ingest.num_shards=0", "ingest.num_shards"),
        ("ingest.http_timeout_s=0", "ingest.http_timeout_s"),
        ("ingest.images.max_side=0", "ingest.images.max_side"),
        ("ingest.images.quality=101", "ingest.images.quality"),
        ("ray.num_cpus=0", "ray.num_cpus"),
        ("ray.object_store_memory=1000", "ray.object_store_memory"),
        ("seed=-1", "seed"),
        ("stages=[]", "stages"),
    ],
)
def test_out_of_range_values_name_the_full_key_once(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    message = str(exc.value)
    assert message.startswith(key + ": "), message
    assert message.count(key + ":") == 1, message  # named once, not prefixed twice


def test_range_errors_state_the_allowed_range():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.learning_rate=-1"])
    assert str(exc.value) == "train.learning_rate: must be > 0, got -1.0"
    with pytest.raises(ConfigError, match=r"top_p: must be in \(0, 1\], got 0\.0"):
        load_config(None, ["user_preferences.sampling.top_p=0"])
    with pytest.raises(ConfigError, match=r"known: \['popularity', 'sasrec', 'zero_shot'"):
        load_config(None, ["evaluate.baselines=[bogus]"])


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=-1",
        "train.max_steps=1",
        "train.weight_decay=0",
        "train.grad_clip=0",
        "train.eval_samples=0",
        "train.max_failures=-1",
        "train.lora.dropout=0",
        "train.zero.persistence_threshold=0",
        "evaluate.max_users=-1",
        "evaluate.baselines=[]",
        "item_summaries.sampling.temperature=0",
        "item_summaries.sampling.top_p=1",
        "item_summaries.pool.num_gpus=0.5",
        "item_summaries.pool.num_gpus=2",
        "item_summaries.pool.num_cpus=0",
        "item_summaries.engine.gpu_memory_utilization=1",
        "prepare.split_ratios=[1,0,0]",
        "ingest.http_retries=0",
        "ray.object_store_memory=null",
    ],
)
def test_boundary_values_are_accepted(override):
    load_config(None, [override])


def test_direct_construction_is_checked_too():
    from mllm_msr.config import EngineConfig, SamplingConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"^learning_rate: must be > 0"):
        TrainConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"^max_new_tokens: must be >= 1"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"^max_num_seqs: must be >= 1"):
        EngineConfig(max_num_seqs=0)


def test_evaluate_uses_the_config_list_of_baselines():
    from mllm_msr import config
    from mllm_msr.stages import evaluate

    assert evaluate.KNOWN_BASELINES is config.KNOWN_BASELINES


# --------------------------------------------------------------------------- models


def _hub_cache_with(root: Path, repo_id: str) -> None:
    """A Hugging Face cache layout holding ``repo_id``'s config.json at one snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache (the real one is never consulted)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_validate_models_accepts_the_default_tiny_models(hub_cache):
    from mllm_msr.config import models_in_use, validate_models

    cfg = load_config(None)
    validate_models(cfg)
    assert [key for key, _, _ in models_in_use(cfg)] == [
        "item_summaries.engine.model",
        "user_preferences.engine.model",
        "train.model",
    ]


@pytest.mark.parametrize(
    "overrides, key, needles",
    [
        (["item_summaries.engine.model=tiny:nope"], "item_summaries.engine.model", ["tiny:nope"]),
        (["user_preferences.engine.model=pkg:nope"], "user_preferences.engine.model", ["pkg:nope"]),
        (["train.model=/nonexistent"], "train.model", ["/nonexistent", "no local directory"]),
        (
            ["train.model=org/never-downloaded"],
            "train.model",
            ["org/never-downloaded", "no local directory", "Hugging Face cache"],
        ),
        (["train.model=tiny:qwen2"], "train.family", ["tiny:qwen2", "'qwen2'", "qwen2_vl"]),
        (
            ["stages=[evaluate]", "train.model=/nonexistent"],  # evaluate's zero_shot loads it
            "train.model",
            ["/nonexistent"],
        ),
    ],
)
def test_validate_models_names_the_key_and_value(hub_cache, overrides, key, needles):
    from mllm_msr.config import validate_models

    with pytest.raises(ConfigError) as exc:
        validate_models(load_config(None, overrides))
    message = str(exc.value)
    assert message.startswith(key + ": "), message
    for needle in needles:
        assert needle in message
    if "Hugging Face cache" in needles:
        assert str(hub_cache) in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["item_summaries.enabled=false", "item_summaries.engine.model=tiny:nope"],
        ["stages=[ingest,prepare]", "train.model=/nonexistent"],
        ["stages=[evaluate]", "evaluate.baselines=[popularity]", "train.model=/nonexistent"],
    ],
)
def test_validate_models_skips_models_no_stage_loads(hub_cache, overrides):
    from mllm_msr.config import validate_models

    validate_models(load_config(None, overrides))


def test_validate_models_finds_local_folders_and_cached_hub_models(hub_cache, tmp_path):
    from mllm_msr.config import validate_models

    folder = tmp_path / "my-model"
    folder.mkdir()
    _hub_cache_with(hub_cache, "org/cached-model")
    cfg = load_config(
        None,
        [f"item_summaries.engine.model={folder}", "user_preferences.engine.model=org/cached-model"],
    )
    validate_models(cfg)
    with pytest.raises(ConfigError, match=r"train\.model: model 'org/other' not found"):
        validate_models(load_config(None, ["train.model=org/other"]))


def test_validate_models_checks_the_packaged_models_package(monkeypatch):
    from mllm_msr import models
    from mllm_msr.config import validate_models

    cfg = load_config(None, ["train.model=pkg:smollm2", "train.family=smollm2"])
    absent = models.PackagedModel(
        "smollm2", "mllm-msr-no-such-distribution", "0", "x.gguf", "smollm2", "absent"
    )
    monkeypatch.setitem(models.PACKAGED_MODELS, "smollm2", absent)
    with pytest.raises(ConfigError, match=r"^train\.model: 'pkg:smollm2': .*make bench-install"):
        validate_models(cfg)
    monkeypatch.setattr(models, "gguf_path", lambda model: Path("/installed/x.gguf"))
    validate_models(cfg)


def test_validate_models_imports_no_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mllm_msr.config import load_config, validate_models\n"
        "validate_models(load_config(None, ['train.model=/nonexistent', 'stages=[ingest]']))\n"
        "validate_models(load_config(None))\n"
        "heavy = {'torch', 'vllm', 'ray', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_custom_resources_for_placement():
    from mllm_msr.config import ConfigError, config_from_dict

    cfg = config_from_dict(
        {},
        ["item_summaries.pool.resources.summarizer=1", "train.resources_per_worker={trainer: 0.5}"],
    )
    assert cfg.item_summaries.pool.resources == {"summarizer": 1.0}
    assert cfg.train.resources_per_worker == {"trainer": 0.5}
    with pytest.raises(ConfigError, match="resources_per_worker: must be custom resource names"):
        config_from_dict({}, ["train.resources_per_worker.CPU=2"])
    with pytest.raises(ConfigError, match="pool.resources|resources: must be amounts >= 0"):
        config_from_dict({}, ["user_preferences.pool.resources.x=-1"])
