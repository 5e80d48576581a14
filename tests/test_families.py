"""The model-family registry (mllm_msr.families): one home for what differs between families.

Training (``recommender/train_loop.py``), scoring (``recommender/score.py``), the collator's image sizing and
the LoRA target selection (``engines/peft.py``) read it; the vLLM engines read the prompt side
(placeholders, processor kwargs). ``train.family`` is checked against the model's type.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mllm_msr import config, families, prompts
from mllm_msr.tiny import TINY_SPECS, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_registry_entries_are_consistent():
    assert prompts.FAMILIES is families.FAMILIES and prompts.family is families.family
    for name, fam in families.FAMILIES.items():
        assert fam.name == name and fam.model_types and fam.answers == (prompts.YES, prompts.NO)
        if fam.multimodal:
            assert fam.auto_class == families.IMAGE_TEXT and fam.processor == "processor"
            assert fam.image_placeholder and fam.image_grid and fam.vision_modules
            assert fam.image_tokens is not None
        else:
            assert fam.auto_class == families.CAUSAL_LM and fam.processor == "tokenizer"
            assert fam.image_placeholder is None and not fam.vision_modules
    with pytest.raises(KeyError, match="known"):
        families.family("gpt")


def test_no_copies_of_the_family_rules_outside_the_registry():
    """The auto-class choice, vision-config sniffing and patch sizing live in families.py."""
    pattern = re.compile(
        r"AutoModelForImageTextToText|hasattr\(config, .vision_config.\)"
        r"|getattr\([^)]*.(patch_size|merge_size)."
    )
    for path in (ROOT / "mllm_msr").rglob("*.py"):
        if path.name != "families.py":
            assert not pattern.search(path.read_text()), path


def test_shipped_configs_name_known_families():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = config.load_config(path)
        for key, _model, fam in config.models_in_use(cfg):
            assert fam in families.FAMILIES, (path.name, key)
    paper = config.load_config(ROOT / "configs" / "paper-llava.yaml")
    assert "v1.6" in paper.train.model and paper.train.family == "llava_next"  # not llava (1.5)


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_family_of_each_tiny_model_is_inferred_and_checked(name):
    path = resolve_model(f"tiny:{name}")
    expected = TINY_SPECS[name].family
    inferred = families.resolve(path)  # llama3 and smollm2 share model_type llama: the first
    assert inferred.model_types == families.family(expected).model_types
    assert families.resolve(path, expected) is families.family(expected)
    wrong = "qwen2" if expected != "qwen2" else "qwen2_vl"
    with pytest.raises(ValueError, match=rf"train\.family: '{wrong}' expects .*{expected}"):
        families.resolve(path, wrong, "train.family")


def test_unknown_model_types_fall_back_to_the_config():
    class Config:
        model_type = "somevlm"
        vision_config = object()

    fam = families.for_config(Config())
    assert fam.multimodal and fam.auto_class == families.IMAGE_TEXT
    assert fam.vision_modules == families.ALL_VISION_MODULES
    del Config.vision_config
    assert families.for_config(Config()).auto_class == families.CAUSAL_LM


@pytest.mark.parametrize("name", ["qwen2-vl", "llava"])
def test_image_sizing_rule_per_family(name):
    from transformers import AutoProcessor

    path = resolve_model(f"tiny:{name}")
    processor = AutoProcessor.from_pretrained(path)
    fam = families.resolve(path)
    ip = processor.image_processor
    legacy = (getattr(ip, "patch_size", None) or 1) * (getattr(ip, "merge_size", None) or 1)
    for size in (20, 56, 100, 112, 224, 230):
        side = families.image_side(size, processor, fam)
        assert side == families.image_side(size, processor)  # no family: the same rule
        assert side == max(legacy, round(size / legacy) * legacy)  # the collator's old rule
    if name == "qwen2-vl":
        assert fam.image_grid(ip) == 28 and families.image_side(100, processor, fam) == 112
    else:
        assert families.image_side(100, processor, fam) == 100  # CLIP crops by itself


@pytest.mark.parametrize("name", ["qwen2-vl", "llava"])
def test_vision_modules_of_a_family_select_the_same_lora_targets(name):
    from mllm_msr.config import LoraConfig
    from mllm_msr.engines import peft as lora

    path = resolve_model(f"tiny:{name}")
    fam = families.resolve(path)
    model = families.load_model(path, fam)
    for train_vision in (False, True):
        cfg = LoraConfig(target_modules=["q_proj", "v_proj"], train_vision=train_vision)
        assert lora.lora_target_names(model, cfg, fam) == lora.lora_target_names(model, cfg)
    names = [n for n, _ in model.named_modules()]
    vision = [n for n in names if families.is_vision_module(n, fam)]
    assert vision and vision == [n for n in names if families.is_vision_module(n)]


def test_scorer_refuses_a_model_of_another_family():
    from mllm_msr.config import TrainConfig
    from mllm_msr.recommender.score import YesNoScorer

    with pytest.raises(ValueError, match=r"train\.family: 'qwen2' expects .*'qwen2_vl'"):
        YesNoScorer("tiny:qwen2-vl", None, TrainConfig(family="qwen2", image_size=56))


def test_config_check_refuses_a_local_model_of_another_family(tmp_path):
    """Before Ray starts: a model folder whose config.json type is not the family's fails."""
    import json

    from mllm_msr.config import ConfigError, check_model

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    check_model("train.model", str(folder), "llava_next")
    check_model("train.model", str(folder))  # no family: nothing to compare
    with pytest.raises(ConfigError, match=r"train\.family: .* is a 'llava_next' model; family"):
        check_model("train.model", str(folder), "llava")
    (folder / "config.json").write_text("{}")  # no model_type: nothing to compare
    check_model("train.model", str(folder), "llava")


IMAGE_TOKENS = {
    # Qwen-VL: sides rounded to 28 (patch 14 x merge 2), one token per 28x28 block, within
    # the processor's pixel bounds (the qwen2-vl twin: <= 224*224 px, so <= 64 tokens).
    "qwen2-vl": {56: 4, 100: 16, 224: 64, 448: 64},
    "qwen2.5-vl": {56: 4, 100: 16, 224: 64, 448: 256, 672: 576},  # real bounds: 448 -> 16^2
    # LLaVA: CLIP crops to 112 px: (112 / 14)^2 = 64 at any size.
    "llava": {56: 64, 224: 64, 448: 64},
    # LLaVA-NeXT (336 px tiles): base 24^2 = 576; <= 336 px -> a 1x2 grid unpadded to 24x24
    # + 24 newlines; > 336 px -> the 2x2 grid (672x672), 48x48 + 48 newlines.
    "llava-next": {56: 576 + 576 + 24, 336: 576 + 576 + 24, 448: 576 + 48 * 48 + 48},
}


@pytest.mark.parametrize("name", sorted(IMAGE_TOKENS))
def test_image_token_rule_per_family_matches_the_processor(name):
    from PIL import Image
    from transformers import AutoProcessor

    path = resolve_model(f"tiny:{name}")
    processor = AutoProcessor.from_pretrained(path)
    fam = families.resolve(path)
    image_id = processor.tokenizer.convert_tokens_to_ids(
        "<|image_pad|>" if "qwen" in name else "<image>"
    )
    text = processor.apply_chat_template(
        prompts.recommender_messages("likes red", "Red ball", image=None),
        tokenize=False,
        add_generation_prompt=True,
    )
    for side, tokens in IMAGE_TOKENS[name].items():
        assert fam.image_tokens(processor, side) == tokens, side
        batch = processor(text=[text], images=[Image.new("RGB", (side, side))], return_tensors="pt")
        assert int((batch["input_ids"] == image_id).sum()) == tokens, side


def _sample(label=1, words=400):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(buf, "PNG")
    text = " ".join(["red circles and blue stripes"] * (words // 5))
    return {
        "preference": text,
        "title": "Red ball",
        "summary": text,
        "image": buf.getvalue(),
        "label": label,
    }


def test_llava_next_image_that_cannot_fit_max_length_fails_early_naming_it():
    from mllm_msr.recommender.collate import RecommenderCollator

    path = resolve_model("tiny:llava-next")
    fam = families.resolve(path)
    processor = families.load_processor(path, fam)
    # The paper's max_length 512 cannot hold LLaVA-v1.6's 1176 image tokens, at any image_size.
    with pytest.raises(ValueError, match=r"train\.max_length=512 .*1176 tokens") as err:
        RecommenderCollator(processor, 512, 336, family=fam)
    assert "lower train.image_size" not in str(err.value)  # it would not help
    assert "train.multimodal: false" in str(err.value)
    # With room: the text is shortened, every image token and the answer are kept.
    collator = RecommenderCollator(processor, 1400, 336, family=fam)
    assert collator.image_tokens == 1176 and collator.min_tokens <= 1400
    for label in (0, 1):
        enc = collator.encode(_sample(label))
        ids = enc["input_ids"][0]
        assert len(ids) <= 1400 and collator.shortened == label + 1
        assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 1176
        answer = collator.answer_ids(label)
        assert ids[-len(answer) :].tolist() == answer
        assert enc["labels"][0][-len(answer) :].tolist() == answer


def test_qwen_vl_image_that_cannot_fit_names_image_size_too():
    from mllm_msr.recommender.collate import RecommenderCollator

    path = resolve_model("tiny:qwen2.5-vl")
    fam = families.resolve(path)
    processor = families.load_processor(path, fam)
    with pytest.raises(ValueError, match=r"max_length=200 .*image_size=448 px costs 256") as err:
        RecommenderCollator(processor, 200, 448, family=fam)
    assert "lower train.image_size" in str(err.value)
    collator = RecommenderCollator(processor, 200, 112, family=fam)  # (112 / 28)^2 = 16 tokens
    assert collator.image_tokens == 16
    enc = collator.encode(_sample(1))
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert enc["input_ids"].shape[1] <= 200 and int((enc["input_ids"] == image_id).sum()) == 16


def test_a_config_whose_max_length_cannot_hold_an_image_fails_before_ray_train(tmp_path):
    """The driver builds the collator before any worker: the paper's max_length 512 with
    LLaVA-v1.6 fails at once, naming the setting, and no Ray is started for it."""
    import ray

    from mllm_msr.config import load_config
    from mllm_msr.runtime import RunDir
    from mllm_msr.stages.train import run_train

    cfg = load_config(
        ROOT / "configs" / "paper-llava.yaml",
        ["train.model=tiny:llava-next", "train.max_length=512", f"run_dir={tmp_path / 'run'}"],
    )
    was_up = ray.is_initialized()
    with pytest.raises(ValueError, match=r"train\.max_length=512 .*1176 tokens"):
        run_train(cfg, RunDir(cfg.run_dir))
    assert ray.is_initialized() == was_up
