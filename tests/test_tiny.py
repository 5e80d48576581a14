"""Tiny offline models: deterministic build, tokenizer invariants, chat template, cache reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_msr import prompts
from mllm_msr.tiny import (
    STAMP_FILE,
    TINY_SPECS,
    build_tiny,
    default_cache_dir,
    resolve_model,
    tiny_family,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    for name in TINY_SPECS:
        build_tiny(name, root)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_is_deterministic(cache, tmp_path):
    for name in TINY_SPECS:
        again = build_tiny(name, tmp_path)
        first = _files(cache / "tiny" / name)
        assert _files(again) == first
        assert "model.safetensors" in first and "tokenizer.json" in first


def test_models_are_small(cache):
    for name in TINY_SPECS:
        size = sum(len(b) for b in _files(cache / "tiny" / name).values())
        assert size < 3_000_000, (name, size)


def test_reuse_from_cache_and_rebuild_when_stale(cache):
    path = cache / "tiny" / "qwen2"
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert Path(resolve_model("tiny:qwen2", cache)) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    stamp = json.loads((path / STAMP_FILE).read_text())
    (path / STAMP_FILE).write_text(json.dumps({**stamp, "version": -1}))
    rebuilt = build_tiny("qwen2", cache)
    assert rebuilt == path
    assert json.loads((path / STAMP_FILE).read_text()) == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_concurrent_builders_do_not_clash(cache, tmp_path):
    code = (
        "import sys; from mllm_msr.tiny import build_tiny; print(build_tiny('qwen2', sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    paths = {p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert paths == {str(tmp_path / "tiny" / "qwen2")}
    assert _files(tmp_path / "tiny" / "qwen2") == _files(cache / "tiny" / "qwen2")
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["qwen2"]


def test_resolve_model_passes_other_specs_through(tmp_path):
    assert resolve_model("/models/llava", tmp_path) == "/models/llava"
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct", tmp_path) == "Qwen/Qwen2-VL-2B-Instruct"
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model("tiny:nope", tmp_path)
    assert tiny_family("tiny:qwen2-vl") == "qwen2_vl"
    assert tiny_family("/models/x") is None


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLM_MSR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MLLM_MSR_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "mllm_msr")


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_yes_no_are_single_tokens(cache, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache / "tiny" / name)
    for word in (prompts.YES, prompts.NO, " " + prompts.YES, " " + prompts.NO):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    rendered = tok.apply_chat_template(
        prompts.user_text("Answer."), tokenize=False, add_generation_prompt=True
    )
    for word in (prompts.YES, prompts.NO):
        base = tok.encode(rendered, add_special_tokens=False)
        assert len(tok.encode(rendered + word, add_special_tokens=False)) == len(base) + 1


def test_vl_chat_template_and_processor_place_image_tokens(cache):
    from transformers import AutoProcessor

    path = cache / "tiny" / "qwen2-vl"
    processor = AutoProcessor.from_pretrained(path)
    chat = prompts.item_summary_messages(None, "Red circle")
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.count(prompts.image_placeholder("qwen2_vl")) == 1
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Please describe"
    )
    assert text.endswith("present in the image.<|im_end|>\n<|im_start|>assistant\n")

    image = Image.new("RGB", (448, 448), (200, 30, 30))
    batch = processor(text=[text], images=[image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 448x448 is resized under the tiny max_pixels (224*224): 16x16 patches, merged 2x2 -> 64.
    assert int((batch["input_ids"] == image_id).sum()) == 64
    assert "mm_token_type_ids" in batch  # needed by the Qwen2-VL training forward

    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_llava_processor_places_image_tokens(cache):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = cache / "tiny" / "llava"
    processor = AutoProcessor.from_pretrained(path)
    chat = prompts.recommender_messages("likes red", "Red ball", image=None)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST] <image>\nBased on") and text.endswith(" [/INST]")
    batch = processor(text=[text], images=[Image.new("RGB", (300, 200))], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 64  # 112 px / 14 = 8x8 patches
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_qwen2_5_vl_twin_counts_image_tokens_like_the_real_model(cache):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = cache / "tiny" / "qwen2.5-vl"
    processor = AutoProcessor.from_pretrained(path)
    chat = prompts.recommender_messages("likes red", "Red ball", image=None)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.count(prompts.image_placeholder("qwen2_5_vl")) == 1
    batch = processor(text=[text], images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # The real model's pixel bounds keep 448 px: 32x32 patches of 14 px, merged 2x2 -> 256.
    assert int((batch["input_ids"] == image_id).sum()) == 256
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        # 336x336: best pinpoint 336x672 (least padding), a 1x2 grid of 24x24-patch tiles =
        # 24x48 features, unpadded to the square image's 24x24, + 24 row newlines = 600; plus
        # the 24x24 = 576 base-image features.
        ((336, 336), 576 + 24 * 24 + 24),
        # 672 wide x 336 high: pinpoint (h 336, w 672) fits exactly, no unpadding: 24x48 + 24.
        ((672, 336), 576 + 24 * 48 + 24),
    ],
)
def test_llava_next_twin_tiles_any_resolution(cache, size, tokens):
    from transformers import AutoProcessor

    path = cache / "tiny" / "llava-next"
    processor = AutoProcessor.from_pretrained(path)
    chat = prompts.recommender_messages("likes red", "Red ball", image=None)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST] <image>\nBased on") and text.endswith(" [/INST]")
    batch = processor(text=[text], images=[Image.new("RGB", size)], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == tokens


def test_text_twins_use_their_family_templates(cache):
    from transformers import AutoTokenizer

    chat = prompts.user_text("Answer.")
    llama = AutoTokenizer.from_pretrained(cache / "tiny" / "llama3")
    assert llama.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAnswer.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    qwen = AutoTokenizer.from_pretrained(cache / "tiny" / "qwen2.5")
    assert qwen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nAnswer.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_vllm_loads_and_generates_with_every_twin(cache):
    """Each twin of a shipped config's family starts in vLLM (CPU) through our adapter and
    generates; multimodal twins count their image tokens in the prompt."""
    from mllm_msr.config import EngineConfig, SamplingConfig
    from mllm_msr.engines.vllm import VLLMEngine

    image = Image.new("RGB", (336, 336), (200, 30, 30))
    twins = {"qwen2.5-vl": "qwen2_5_vl", "llava-next": "llava_next", "llama3": "llama3"}
    twins["qwen2.5"] = "qwen2"
    for name, family in twins.items():
        cfg = EngineConfig(model=f"tiny:{name}", family=family, dtype="float32", max_model_len=2048)
        with VLLMEngine(cfg, cache_dir=cache) as engine:
            multimodal = engine.family.multimodal
            chat = (
                prompts.item_summary_messages(image, "Red circle")
                if multimodal
                else prompts.user_text("Describe red circles.")
            )
            out = engine.generate([chat], SamplingConfig(max_new_tokens=4, temperature=0.0))[0]
            assert out.output_tokens >= 1 and out.text, name
            # image tokens: 24x24 patch features (qwen2.5-vl: 336 px / 14 = 24, merged 2x2 ->
            # 144; llava-next: 1176 as above), the rest is template + text
            assert out.prompt_tokens > {"qwen2.5-vl": 144, "llava-next": 1176}.get(name, 0), name
            yes, no = engine.answer_token_ids()
            assert yes != no
