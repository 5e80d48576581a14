"""Tiny random-weight models built fully offline, for the CPU demo and the tests.

No model hub is reachable here, so the demo and the tests run on models built from scratch:

* ``qwen2-vl``: a 2-layer Qwen2-VL (vision tower + language model) with its processor
  (the item summarizer and the recommender of the demo);
* ``qwen2``: a 2-layer Qwen2 text LLM (the preference summarizer of the demo);
* ``llava``: a 2-layer LLaVA (CLIP tower + Llama LM, Mistral-instruct ``[INST]`` template,
  fixed 112 px input), the paper's model family.

Each has a byte-level BPE tokenizer trained locally on a built-in English corpus, carrying the
family's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, and for Qwen2-VL
``<|vision_start|>``, ``<|image_pad|>``, ...; ``<s>``, ``</s>``, ``<image>`` for LLaVA) and the
family's chat template. ``Yes`` and ``No`` are single tokens (the recommender scores the first
answer token). Weights are random but seeded: building twice gives byte-identical files. Head
size 32 is one that vLLM's CPU attention supports.

Models are saved under ``<cache_dir>/tiny/<name>/`` with a stamp file and reused while the stamp
matches :data:`TINY_VERSION`. A build writes to a temporary folder and renames it into place, so
concurrent builders (several Ray actors on one node) never see a half-written model.

Usage::

    path = resolve_model("tiny:qwen2-vl")          # builds once, then reuses
    python -m mllm_msr.tiny build --names qwen2-vl qwen2

Training note (transformers 5.19): the Qwen2-VL training forward needs ``mm_token_type_ids``
(used for M-RoPE positions) whenever ``pixel_values`` are given. ``Qwen2VLProcessor`` returns it
by default (``return_mm_token_type_ids=True``); pass the processor's whole output to the model.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TINY_VERSION = 2
"""Bump when anything that changes the built files changes (corpus, sizes, template)."""

_BUILD_LOCK = threading.Lock()
"""Builds seed torch's global RNG: serialize builds of one process (threads, Ray threaded actors)."""

TINY_PREFIX = "tiny:"
STAMP_FILE = "mllm_msr_tiny.json"
VOCAB_SIZE = 2048
"""Target BPE vocabulary size (the corpus may support fewer merges)."""

# --------------------------------------------------------------------------- chat templates

QWEN_CHAT_TEMPLATE = r"""
{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
{%- for part in message['content'] %}
{%- if part['type'] in ('image', 'image_url', 'image_pil') %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif part['type'] == 'text' %}
{{- part['text'] }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
""".strip()
"""Qwen2(-VL)-style ChatML template. Image parts (``{"type": "image"}``, ``image_url``,
``image_pil``) render as ``<|vision_start|><|image_pad|><|vision_end|>``; the text-only Qwen2
template is the same (it never receives image parts)."""

LLAVA_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{{- message['content'] + '\n\n' }}
{%- elif message['role'] == 'user' %}
{{- '[INST] ' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
{%- for part in message['content'] %}
{%- if part['type'] in ('image', 'image_url', 'image_pil') %}
{{- '<image>\n' }}
{%- elif part['type'] == 'text' %}
{{- part['text'] }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}
{{- ' ' + message['content'] + eos_token }}
{%- endif %}
{%- endfor %}
""".strip()
"""Mistral-instruct style template of LLaVA-v1.6-Mistral (the paper's model): an image part
renders as ``<image>\n`` before the text, the turn is wrapped in ``[INST] ... [/INST]``."""

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

LLAMA3_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
{%- if message['content'] is string %}
{{- message['content'] | trim }}
{%- else %}
{%- for part in message['content'] %}
{%- if part['type'] == 'text' %}
{{- part['text'] | trim }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""".strip()
"""Llama-3-Instruct template (the paper's preference LLM, Llama-3-8B-Instruct): headers
``<|start_header_id|>role<|end_header_id|>`` and turns ending in ``<|eot_id|>``, no default
system message."""

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

QWEN25_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)
"""Qwen2.5-Instruct's ChatML template: as Qwen2's, with Qwen2.5's default system message."""

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# --------------------------------------------------------------------------- corpus

_WORDS = """
Yes No yes no YES NO Yes. No. true false maybe
red orange yellow green blue purple violet pink brown black white grey gray gold silver
beige navy teal cyan magenta maroon olive turquoise crimson dark light bright pale colour color
colours colors colourful colorful
circle circles square squares triangle triangles star stars heart hearts rectangle diamond
hexagon oval ellipse line lines dot dots shape shapes round pointed
striped stripes dotted spotted checked checkered plain solid gradient pattern patterns
zigzag wavy grid floral geometric abstract textured smooth
big small large tiny huge little wide narrow tall short thin thick
image images picture photo photos cover video videos item items title titles text description
describe summary summarize summarise preference preferences user users history watched
interact interaction interactions recommend recommendation next opportunity previous
chronological list content visual style visual features objects notable elements present
paragraph continuous detailed clear concise answer question response respond only
based on the a an of and or in to with for is are was were this that these those it its
their they he she we you your his her them our as at by from be been being have has had
do does did not no any other words space punctuation include including about also known
aspects appears start should would could will can may must keep repeat details
please provide information following below above given one two three four five six seven
eight nine ten first second last new old good bad best favourite favorite like likes liked
enjoy enjoys enjoyed prefer prefers preferred love loves loved
music movie movies film films game games book books toy toys baby clothes shoe shoes bag
sport sports travel food cooking art painting drawing design poster sticker card mug shirt
dress hat lamp chair table cup bottle phone watch ball kite flag box
system assistant helpful You are a helpful assistant. user model
"""

_SENTENCES = """
You are a helpful assistant.
Please describe this image, which is the cover of an item. Provide a detailed description in
one continuous paragraph, including content information and visual features such as colors,
objects, text, and any notable elements present in the image.
The image shows a red circle on a white background.
The image shows a blue square with green stripes.
The cover shows a yellow star and a purple triangle with a dotted pattern.
Below is a chronological list of items previously watched by the user:
1. Title: Red Circle, Description: a red circle on a plain background.
2. Title: Blue Striped Square, Description: a blue square with white stripes.
3. Title: Green Dotted Triangle, Description: a green triangle with dots.
We also know the user's previous preference:
Based on the content and visual style of the items listed above, please summarize the user's
preferences in one continuous paragraph. Only provide information about the user's preferences;
do not repeat details about the previously watched items. Keep it clear and concise.
The answer should start with 'The user appears to have a preference for'.
The user appears to have a preference for bright colours, round shapes and striped patterns.
Based on the previous interaction history, the user's preference can be summarized as:
Please predict whether this user would interact with the item at the next opportunity.
The item's title is 'Orange Wavy Hexagon', and the given image is this item's cover.
Please only respond 'Yes' or 'No'.
Answer with Yes or No.
Yes
No
"""


def _corpus() -> list[str]:
    """A small fixed corpus: every word several times, the sentences, digits and punctuation."""
    words = _WORDS.split()
    lines = [line.strip() for line in _SENTENCES.strip().splitlines() if line.strip()]
    corpus: list[str] = []
    for rep in range(8):
        corpus.extend(" ".join(words[i : i + 12]) for i in range(rep % 3, len(words), 12))
        corpus.extend(lines)
        corpus.append(" ".join(str(n) for n in range(rep * 50, rep * 50 + 50)))
    corpus.extend(["Yes", "No", " Yes", " No"] * 64)
    corpus.append("0123456789 .,:;!?'\"()[]{}<>-_/\\|@#$%^&*+=~`")
    return corpus


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny model family."""

    name: str
    family: str
    """``qwen2_vl`` or ``qwen2`` (a key of the prompt family registry)."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    """hidden_size / num_heads = 32: a head size vLLM's CPU attention supports."""
    num_kv_heads: int = 1
    vision_embed_dim: int = 32
    vision_depth: int = 2
    vision_heads: int = 1
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 224 * 224
    """Qwen2-VL: at most 16x16 patches of 14 px, merged 2x2: <= 64 image tokens per image."""
    image_size: int = 112
    """LLaVA: fixed square input resolution (8x8 patches of 14 px: 64 image tokens)."""
    max_position_embeddings: int = 4096
    initializer_range: float = 0.2
    """Larger than usual so that different inputs give visibly different random outputs."""
    seed: int = 0

    def text_sizes(self, vocab_size: int) -> dict[str, int | float]:
        """The language model's size arguments, shared by every family's text config."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
        }


TINY_SPECS: dict[str, TinySpec] = {
    "qwen2-vl": TinySpec(name="qwen2-vl", family="qwen2_vl"),
    "qwen2": TinySpec(name="qwen2", family="qwen2", seed=1),
    "llava": TinySpec(name="llava", family="llava", seed=2),
    "qwen2.5-vl": TinySpec(
        name="qwen2.5-vl",
        family="qwen2_5_vl",
        image_min_pixels=56 * 56,
        image_max_pixels=12845056,  # Qwen2.5-VL-7B-Instruct's processor bounds
        max_position_embeddings=128000,
        seed=3,
    ),
    "llava-next": TinySpec(
        name="llava-next",
        family="llava_next",
        image_size=336,
        max_position_embeddings=32768,
        seed=4,
    ),
    "llama3": TinySpec(name="llama3", family="llama3", max_position_embeddings=8192, seed=5),
    "qwen2.5": TinySpec(name="qwen2.5", family="qwen2", max_position_embeddings=32768, seed=6),
    "smollm2": TinySpec(name="smollm2", family="smollm2", max_position_embeddings=8192, seed=7),
}
"""Tiny twins of every family a shipped config names: Qwen2-VL and Qwen2 (the demo), LLaVA
(fixed 112 px), Qwen2.5-VL (window attention vision tower) and Qwen2.5 text
(``configs/qwen2.5-vl.yaml``), LLaVA-NeXT with the real model's 336 px CLIP tiles and
any-resolution grid pinpoints (``configs/paper-llava.yaml``, so image token counts equal the
real model's), a Llama-3-Instruct text model (the paper's preference LLM) and a SmolLM2-style
one (Llama with ChatML, the twin of ``pkg:smollm2``). Twins keep their real model's context
length (``max_position_embeddings``), so a config's ``max_model_len`` is checked as on a GPU."""

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""LLaVA-v1.6-Mistral-7B's ``image_grid_pinpoints`` (any-resolution tiling candidates)."""


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(
    special_tokens: list[str],
    chat_template: str,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    bos_token: str | None = None,
    vocab_size: int = VOCAB_SIZE,
):
    """Train a byte-level BPE on the built-in corpus and wrap it as a fast HF tokenizer.

    ``special_tokens`` get the first ids, in order; ``eos``/``pad``/``bos`` must be among them.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        extra_special_tokens=[
            t for t in special_tokens if t not in (eos_token, pad_token, bos_token)
        ],
        chat_template=chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    for word in ("Yes", "No"):
        ids = hf_tok.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer: {word!r} is not one token: {ids}")
    return hf_tok


# --------------------------------------------------------------------------- models


def _save_random_qwen(model_cls, config, spec: TinySpec, ids: dict[str, int], out: Path) -> None:
    """Seed, instantiate ``model_cls(config)`` with random weights, set Qwen's generation ids, save."""
    import torch

    config.architectures = [model_cls.__name__]
    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    _finish_generation_config(
        model,
        eos=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad=ids["<|endoftext|>"],
        bos=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)


def _build_qwen2_vl(spec: TinySpec, out: Path, v25: bool = False) -> None:
    """Qwen2-VL, or with ``v25`` Qwen2.5-VL (window-attention vision tower, RMSNorm + SwiGLU,
    ``out_hidden_size``; same patch 14 x merge 2 image sizing and ChatML template)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_tokenizer(QWEN_VL_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    vision = {
        "depth": spec.vision_depth,
        "num_heads": spec.vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": spec.initializer_range,
    }
    if v25:
        vision.update(
            hidden_size=spec.vision_embed_dim,
            out_hidden_size=spec.hidden_size,
            intermediate_size=2 * spec.vision_embed_dim,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
        )
    else:
        vision.update(embed_dim=spec.vision_embed_dim, hidden_size=spec.hidden_size, mlp_ratio=2)
    config_cls = Qwen2_5_VLConfig if v25 else Qwen2VLConfig
    config = config_cls(
        text_config={
            **spec.text_sizes(len(tok)),
            "max_window_layers": spec.num_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model_cls = Qwen2_5_VLForConditionalGeneration if v25 else Qwen2VLForConditionalGeneration
    _save_random_qwen(model_cls, config, spec, ids, out)

    size = {"shortest_edge": spec.image_min_pixels, "longest_edge": spec.image_max_pixels}
    processor_cls = Qwen2_5_VLProcessor if v25 else Qwen2VLProcessor
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def _build_qwen2(spec: TinySpec, out: Path, chat_template: str = QWEN_CHAT_TEMPLATE) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(QWEN_SPECIAL_TOKENS, chat_template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2Config(
        **spec.text_sizes(len(tok)),
        max_window_layers=spec.num_layers,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    _save_random_qwen(Qwen2ForCausalLM, config, spec, ids, out)
    tok.save_pretrained(out)


def _build_llava(spec: TinySpec, out: Path, next_: bool = False) -> None:
    """LLaVA (CLIP + Llama, fixed crop), or with ``next_`` LLaVA-NeXT as LLaVA-v1.6-Mistral:
    CLIP tiles of ``spec.image_size`` px, any-resolution tiling over
    :data:`LLAVA_NEXT_PINPOINTS`, a Mistral language model, the ``[INST]`` template."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        MistralConfig,
    )

    tok = build_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        LLAVA_CHAT_TEMPLATE,
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    text_cls = MistralConfig if next_ else LlamaConfig
    extra = {"sliding_window": None} if next_ else {}
    config_cls = LlavaNextConfig if next_ else LlavaConfig
    if next_:
        extra_config = {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS, "vision_feature_layer": -2}
    else:
        extra_config = {"vision_feature_layer": -1}
    config = config_cls(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_embed_dim,
            intermediate_size=2 * spec.vision_embed_dim,
            num_hidden_layers=spec.vision_depth,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=14,
            projection_dim=spec.vision_embed_dim,
            initializer_range=spec.initializer_range,
        ),
        text_config=text_cls(
            **spec.text_sizes(len(tok)),
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            **extra,
        ),
        image_token_id=ids["<image>"],
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra_config,
    )
    model_cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    config.architectures = [model_cls.__name__]
    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    _finish_generation_config(model, eos=[ids["</s>"]], pad=ids["<pad>"], bos=ids["<s>"])
    model.save_pretrained(out)
    # transformers 5 saves the CLIP tower as ``vision_tower.*``; vLLM (and hub checkpoints)
    # name it ``vision_tower.vision_model.*``. transformers loads both spellings.
    weights = out / "model.safetensors"
    state = load_file(weights)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :])
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in state.items()
    }
    save_file(dict(sorted(renamed.items())), weights, metadata={"format": "pt"})

    side = {"height": spec.image_size, "width": spec.image_size}
    if next_:
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": spec.image_size},
            crop_size=side,
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        )
    else:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": spec.image_size}, crop_size=side
        )
    processor_cls = LlavaNextProcessor if next_ else LlavaProcessor
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=LLAVA_CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def _finish_generation_config(model, eos: list[int], pad: int, bos: int) -> None:
    gen = model.generation_config
    gen.eos_token_id = eos
    gen.pad_token_id = pad
    gen.bos_token_id = bos
    gen.do_sample = False


def _build_llama3(spec: TinySpec, out: Path, chatml: bool = False) -> None:
    """A Llama text LLM with the Llama-3-Instruct template and special tokens, or with
    ``chatml`` SmolLM2-Instruct's (Llama architecture, ChatML template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if chatml:
        special, eos, pad, bos = QWEN_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", "<|im_start|>"
        tok = build_tokenizer(special, QWEN_CHAT_TEMPLATE, eos, pad, bos)
    else:
        special, eos, pad = LLAMA3_SPECIAL_TOKENS, "<|eot_id|>", "<|finetune_right_pad_id|>"
        bos = "<|begin_of_text|>"
        tok = build_tokenizer(special, LLAMA3_CHAT_TEMPLATE, eos, pad, bos)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    last = "<|endoftext|>" if chatml else "<|end_of_text|>"
    config = LlamaConfig(
        **spec.text_sizes(len(tok)),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=ids[bos],
        eos_token_id=[ids[last], ids[eos]],
        pad_token_id=ids[pad],
        tie_word_embeddings=False,
    )
    import torch

    config.architectures = [LlamaForCausalLM.__name__]
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    _finish_generation_config(model, eos=[ids[last], ids[eos]], pad=ids[pad], bos=ids[bos])
    model.save_pretrained(out)
    tok.save_pretrained(out)


_BUILDERS: dict[str, Callable[[TinySpec, Path], None]] = {
    "qwen2-vl": _build_qwen2_vl,
    "qwen2": _build_qwen2,
    "llava": _build_llava,
    "qwen2.5-vl": lambda spec, out: _build_qwen2_vl(spec, out, v25=True),
    "llava-next": lambda spec, out: _build_llava(spec, out, next_=True),
    "llama3": _build_llama3,
    "qwen2.5": lambda spec, out: _build_qwen2(spec, out, chat_template=QWEN25_CHAT_TEMPLATE),
    "smollm2": lambda spec, out: _build_llama3(spec, out, chatml=True),
}
"""Tiny model name -> builder (``builder(spec, out_dir)``)."""


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$MLLM_MSR_CACHE`` or ``<repository>/.cache/mllm_msr``."""
    env = os.environ.get("MLLM_MSR_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "mllm_msr"


def _stamp(spec: TinySpec) -> dict:
    return {"version": TINY_VERSION, "name": spec.name, "family": spec.family, "seed": spec.seed}


def _is_current(path: Path, spec: TinySpec) -> bool:
    try:
        return json.loads((path / STAMP_FILE).read_text()) == _stamp(spec)
    except (OSError, ValueError):
        return False


def _make_readable(folder: Path) -> None:
    """mkdtemp folders are private (0700); shared caches should be readable like normal files."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def build_tiny(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build the tiny model ``name`` (a key of :data:`TINY_SPECS`) unless a current copy exists.

    Returns ``<cache_dir>/tiny/<name>``. Safe to call from several processes at once.
    """
    if name not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_SPECS)}")
    spec = TINY_SPECS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "tiny" / name
    if not force and _is_current(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per model and cache at a time, across processes (Ray Train workers on a cold
    # cache all ask at once): the others wait on the kernel lock, then find the copy current.
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"tiny-{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_current(final, spec):
            return final
        return _build_and_publish(name, spec, final, force)


def _build_and_publish(name: str, spec: TinySpec, final: Path, force: bool) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent))
    try:
        from mllm_msr.runtime import hub_env, scoped_env

        # built from local files only: never ask the hub, whatever the caller's mode
        with _BUILD_LOCK, scoped_env(hub_env(True)):
            _BUILDERS[name](spec, tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(_stamp(spec), sort_keys=True) + "\n")
        _make_readable(tmp)
        publish_dir(
            tmp,
            final,
            is_current=lambda: _is_current(final, spec),
            replace=force or not _is_current(final, spec),
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_dir(
    tmp: Path, final: Path, is_current: Callable[[], bool], replace: bool = True
) -> None:
    """Move a finished build from ``tmp`` to ``final`` (atomic rename on one filesystem).

    With ``replace``, an existing ``final`` is moved aside first (a concurrent reader keeps its
    open files). When another builder renamed its copy first, that copy is kept if
    ``is_current()`` says so; otherwise the rename error is raised.
    """
    if final.exists() and replace:
        stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_current():
            raise


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Map ``tiny:<name>`` to the local path of the built tiny model and ``pkg:<name>`` to the
    provisioned packaged model (:mod:`mllm_msr.models`); return others unchanged.

    A model folder under a pyarrow URI (``s3://bucket/models/<name>``) is synced into the
    node-local cache on first use, checked against its published manifest
    (:mod:`mllm_msr.model_source`). Any other string is a local path or a hub id that the user
    provides (never downloaded here: runs are offline).
    """
    if spec.startswith(TINY_PREFIX):
        return str(build_tiny(spec[len(TINY_PREFIX) :], cache_dir))
    from mllm_msr.model_source import is_source, node_cache, sync_model

    if is_source(spec):  # into the node's own cache when it sets one (MLLM_MSR_NODE_CACHE)
        return sync_model(spec, node_cache(cache_dir or default_cache_dir()))
    from mllm_msr.models import is_packaged_spec, resolve_packaged

    if is_packaged_spec(spec):  # pkg:<name>: a real model shipped inside a PyPI package
        return resolve_packaged(spec, cache_dir)
    return spec


TWINS: dict[str, str] = {
    "llava-hf/llava-v1.6-mistral-7b-hf": "tiny:llava-next",
    "meta-llama/Meta-Llama-3-8B-Instruct": "tiny:llama3",
    "Qwen/Qwen2.5-VL-7B-Instruct": "tiny:qwen2.5-vl",
    "Qwen/Qwen2.5-7B-Instruct": "tiny:qwen2.5",
    "pkg:smollm2": "tiny:smollm2",
}
"""Every model a shipped config (``configs/*.yaml``) names -> its tiny twin (same family, same
processor settings, random weights): the one override map of the per-config CPU tests."""


def twin_overrides(cfg) -> list[str]:
    """Dotted overrides that swap each model ``cfg`` uses for its tiny twin (:data:`TWINS`);
    ``tiny:`` models stay. Raises for a model with no twin, naming its config key."""
    from mllm_msr.config import models_in_use

    out = []
    for key, model, _family in models_in_use(cfg):
        if model.startswith(TINY_PREFIX):
            continue
        if model not in TWINS:
            raise KeyError(f"{key}: {model!r} has no tiny twin; add one to mllm_msr.tiny.TWINS")
        out.append(f"{key}={TWINS[model]}")
    return out


def tiny_family(spec: str) -> str | None:
    """The prompt family of a ``tiny:<name>`` or ``pkg:<name>`` spec, or None for other models."""
    if spec.startswith(TINY_PREFIX) and spec[len(TINY_PREFIX) :] in TINY_SPECS:
        return TINY_SPECS[spec[len(TINY_PREFIX) :]].family
    from mllm_msr.models import packaged_family

    return packaged_family(spec)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_msr.tiny", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) tiny models and print their paths")
    build.add_argument(
        "--cache-dir", default=None, help="default: $MLLM_MSR_CACHE or .cache/mllm_msr"
    )
    build.add_argument("--names", nargs="+", default=sorted(TINY_SPECS), choices=sorted(TINY_SPECS))
    build.add_argument(
        "--force", action="store_true", help="rebuild even when a current copy exists"
    )
    args = parser.parse_args(argv)
    # DeepSpeed (imported by transformers) prints its accelerator auto-detection to stdout;
    # building needs no accelerator, and stdout carries only the paths.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in args.names:
        print(build_tiny(name, args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
