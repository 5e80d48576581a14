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
    assert (t.lora.r, t.learning_rate, t.max_length) == (8, 2e-5, 512)
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
