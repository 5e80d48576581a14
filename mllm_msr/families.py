"""Model families: the one place that says what differs between the model families we run.

A family (``EngineConfig.family``, ``TrainConfig.family``) names everything the code needs to
know about a model beyond its weights:

- ``model_types``: the Hugging Face ``config.json`` ``model_type`` values of its checkpoints
  (a model of another type is refused, naming the family setting);
- ``auto_class``: the transformers auto class that loads it for training and scoring
  (``AutoModelForImageTextToText`` for vision-language models, ``AutoModelForCausalLM`` for text);
- ``processor``: what encodes its inputs (``"processor"``: ``AutoProcessor`` with an image
  processor; ``"tokenizer"``: ``AutoTokenizer``);
- ``image_grid``: the image sizing rule of the recommender's fixed square images (the side is
  rounded to a multiple of it);
- ``vision_modules``: module-name components of its vision tower and projector (frozen unless
  ``lora.train_vision``);
- ``image_placeholder`` / ``processor_kwargs``: how its chat template spells one image and the
  vLLM multimodal-processor kwargs bounding image resolution;
- ``answers``: the two answers of the recommender (the first token of each is scored);
- ``quirks``: template and tokenizer behaviour worth knowing (notes, not code).

To run a new family: add it here, build its tiny twin (:mod:`mllm_msr.tiny`), and name it in a
config. Stdlib only: :mod:`mllm_msr.config` imports this module (transformers is imported inside
the loading helpers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IMAGE_TEXT = "AutoModelForImageTextToText"
CAUSAL_LM = "AutoModelForCausalLM"
ANSWERS = ("Yes", "No")
"""The recommender's answers (positive, negative)."""


def _no_processor_kwargs(max_pixels: int | None) -> dict[str, Any]:
    return {}


def _qwen_vl_processor_kwargs(max_pixels: int | None) -> dict[str, Any]:
    return {} if max_pixels is None else {"max_pixels": int(max_pixels)}


def patch_merge_grid(image_processor: Any) -> int:
    """Qwen2-VL / Qwen2.5-VL: image sides are multiples of ``patch_size x merge_size`` (14 x 2).

    Also the rule for models of no known family (1 when the processor has neither attribute).
    """
    factor = getattr(image_processor, "patch_size", None) or 1
    return factor * (getattr(image_processor, "merge_size", None) or 1)


def no_grid(image_processor: Any) -> int:
    """The image processor resizes / crops to its own size (CLIP in LLaVA): any side works."""
    return 1


def _size_value(size: Any, key: str, default: int) -> int:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else default


def patch_merge_tokens(processor: Any, side: int) -> int:
    """Qwen2-VL / Qwen2.5-VL: tokens of a ``side`` x ``side`` image.

    The image processor resizes each side to a multiple of ``patch x merge`` (28) within its
    pixel bounds (``size.shortest_edge`` / ``longest_edge`` are pixel counts), then every
    ``merge x merge`` block of ``patch`` px patches is one token: ``(side / 28)^2``.
    """
    ip = getattr(processor, "image_processor", processor)
    patch = getattr(ip, "patch_size", None) or 14
    merge = getattr(ip, "merge_size", None) or 2
    factor = patch * merge
    size = getattr(ip, "size", None) or {}
    min_pixels = _size_value(size, "shortest_edge", 56 * 56)
    max_pixels = _size_value(size, "longest_edge", 28 * 28 * 1280)
    h = max(factor, round(side / factor) * factor)
    if h * h > max_pixels:
        h = max(factor, math.floor(side / math.sqrt(side * side / max_pixels) / factor) * factor)
    elif h * h < min_pixels:
        h = math.ceil(side * math.sqrt(min_pixels / (side * side)) / factor) * factor
    return (h // patch) ** 2 // (merge * merge)


def _clip_grid(processor: Any) -> tuple[int, int, int]:
    """(crop height, crop width, patch size) of a CLIP-tower processor (LLaVA, LLaVA-NeXT)."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    patch = getattr(processor, "patch_size", None) or 14
    return _size_value(crop, "height", 336), _size_value(crop, "width", 336), patch


def _extra_tokens(processor: Any) -> int:
    """The CLS feature is kept only with ``vision_feature_select_strategy: full``."""
    full = getattr(processor, "vision_feature_select_strategy", "default") == "full"
    return int(getattr(processor, "num_additional_image_tokens", 0) or 0) if full else 0


def clip_tokens(processor: Any, side: int) -> int:
    """LLaVA: CLIP crops every image to ``crop_size``: ``(crop / patch)^2`` tokens, any side."""
    h, w, patch = _clip_grid(processor)
    return (h // patch) * (w // patch) + _extra_tokens(processor)


def anyres_tokens(processor: Any, side: int) -> int:
    """LLaVA-NeXT: tokens of a ``side`` x ``side`` image under any-resolution tiling.

    A base image (``(crop / patch)^2`` features) plus the tiles of the best grid pinpoint for
    the image (most effective resolution, then least padding), whose features are cut back to
    the image's aspect ratio ("unpadded") and get one newline token per feature row. For
    LLaVA-v1.6 (336 px crops, patch 14), any square image costs 576 + 24 x 24 + 24 = 1176.
    """
    crop_h, crop_w, patch = _clip_grid(processor)
    pinpoints = processor.image_processor.image_grid_pinpoints
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:  # transformers' select_best_resolution, on a square image
        scale = min(pw / side, ph / side)
        eff = min(int(side * scale) * int(side * scale), side * side)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    rows, cols = best[0] // crop_h, best[1] // crop_w
    cur_h, cur_w = rows * (crop_h // patch), cols * (crop_w // patch)
    if 1 > cur_w / cur_h:  # a square image is wider than the grid: cut rows
        cur_h -= 2 * ((cur_h - int(round(side * (cur_w / side), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(side * (cur_h / side), 7))) // 2)
    base = (crop_h // patch) * (crop_w // patch) + _extra_tokens(processor)
    return base + cur_h * cur_w + cur_h


@dataclass(frozen=True)
class Family:
    """What differs between model families (prompt side, engine side, training side)."""

    name: str
    multimodal: bool
    image_placeholder: str | None = None
    """How the chat template spells one image in the rendered prompt (None: text-only)."""
    processor_kwargs: Callable[[int | None], dict[str, Any]] = field(default=_no_processor_kwargs)
    """``max_pixels -> mm processor kwargs`` (an image-resolution bound, where the family has one)."""
    model_types: tuple[str, ...] = ()
    """``config.json`` ``model_type`` values of this family's checkpoints."""
    image_grid: Callable[[Any], int] | None = None
    """``image_processor -> n``: the recommender's square image side is a multiple of ``n``."""
    image_tokens: Callable[[Any, int], int] | None = None
    """``(processor, side) -> n``: prompt tokens of one ``side`` x ``side`` image (the
    recommender's images are square); None: text-only."""
    fixed_image_tokens: bool = False
    """The image token count does not shrink with ``train.image_size`` (the processor resizes
    to its own crop size): only ``train.max_length`` can make room for an image."""
    vision_modules: tuple[str, ...] = ()
    """Module-name components of the vision tower and multimodal projector."""
    answers: tuple[str, str] = ANSWERS
    quirks: tuple[str, ...] = ()

    @property
    def auto_class(self) -> str:
        """Name of the transformers auto class that loads this family's checkpoints."""
        return IMAGE_TEXT if self.multimodal else CAUSAL_LM

    @property
    def processor(self) -> str:
        """``processor`` (AutoProcessor, with an image processor) or ``tokenizer``."""
        return "processor" if self.multimodal else "tokenizer"


_QWEN_VL = dict(
    multimodal=True,
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    processor_kwargs=_qwen_vl_processor_kwargs,
    image_grid=patch_merge_grid,
    image_tokens=patch_merge_tokens,
    vision_modules=("visual",),
    quirks=(
        "ChatML template; without a system message it inserts 'You are a helpful assistant.'",
        "image tokens = (side / 14)^2 / 4 for a square side; the image merger is in 'visual'",
    ),
)
_LLAVA = dict(
    multimodal=True,
    image_placeholder="<image>",
    image_grid=no_grid,
    fixed_image_tokens=True,
    vision_modules=("vision_tower", "multi_modal_projector"),
)
_CHATML = ("ChatML template (<|im_start|> / <|im_end|>)",)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen2_vl", model_types=("qwen2_vl",), **_QWEN_VL),
        Family("qwen2_5_vl", model_types=("qwen2_5_vl",), **_QWEN_VL),
        Family(
            "llava",
            model_types=("llava",),
            image_tokens=clip_tokens,
            quirks=("CLIP crops images to its crop_size: a fixed number of image tokens",),
            **_LLAVA,
        ),
        Family(
            "llava_next",
            model_types=("llava_next",),
            image_tokens=anyres_tokens,
            quirks=(
                "any-resolution tiling: a base image plus tiles of the best grid pinpoint; "
                "LLaVA-v1.6 spends 1176 tokens on any square image (train.max_length >= ~1300)",
                "LLaVA-v1.6-Mistral: [INST] template, no system role; SentencePiece answers "
                "('▁Yes')",
            ),
            **_LLAVA,
        ),
        Family("qwen2", False, model_types=("qwen2",), quirks=_CHATML),
        Family(
            "llama3",
            False,
            model_types=("llama",),
            quirks=("Llama-3 template (<|start_header_id|> ... <|eot_id|>)",),
        ),
        Family(
            "mistral",
            False,
            model_types=("mistral",),
            quirks=("[INST] template, no system role; SentencePiece answers ('▁Yes')",),
        ),
        Family(
            "smollm2",
            False,
            model_types=("llama",),
            quirks=(*_CHATML, "Llama architecture; converted from a GGUF (mllm_msr.models)"),
        ),
    ]
}
"""Model family -> its settings; ``EngineConfig.family`` / ``TrainConfig.family`` are keys."""

ALL_VISION_MODULES = (
    *sorted({m for f in FAMILIES.values() for m in f.vision_modules}),
    "vision_model",
    "mm_projector",
)
"""Vision module names of every family plus common ones of other VLMs (a model of no family)."""


def family(name: str) -> Family:
    """The :class:`Family` called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def for_config(config: Any, name: str | None = None, setting: str = "family") -> Family:
    """The family of a transformers model ``config``.

    With ``name`` (a config's family setting, called ``setting`` in messages): that family,
    after checking that the model is of one of its ``model_types``. Without: the first family
    whose ``model_types`` has the model's type, or for a model of no known type a family
    inferred from the config (a ``vision_config`` makes it multimodal).
    """
    model_type = getattr(config, "model_type", None)
    if name is not None:
        fam = family(name)
        if model_type not in fam.model_types:
            owners = sorted(f.name for f in FAMILIES.values() if model_type in f.model_types)
            hint = f" (family {' or '.join(owners)})" if owners else ""
            raise ValueError(
                f"{setting}: {name!r} expects a model of type {' or '.join(fam.model_types)}; "
                f"{getattr(config, 'name_or_path', '') or 'the model'} is of type "
                f"{model_type!r}{hint}"
            )
        return fam
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    multimodal = hasattr(config, "vision_config")
    return Family(
        str(model_type),
        multimodal,
        image_grid=patch_merge_grid if multimodal else None,
        image_tokens=patch_merge_tokens if multimodal else None,
        vision_modules=ALL_VISION_MODULES if multimodal else (),
    )


def resolve(model_path: str, name: str | None = None, setting: str = "family") -> Family:
    """:func:`for_config` of the checkpoint at ``model_path`` (reads its config only)."""
    from transformers import AutoConfig

    return for_config(AutoConfig.from_pretrained(model_path), name, setting)


def load_model(model_path: str, fam: Family, dtype: Any = None, **kwargs: Any):
    """Load the checkpoint with ``fam``'s auto class (``dtype``: a torch dtype)."""
    import transformers

    auto = getattr(transformers, fam.auto_class)
    return auto.from_pretrained(model_path, dtype=dtype, **kwargs)


def load_processor(model_path: str, fam: Family):
    """``fam``'s input encoder: ``AutoProcessor`` (multimodal) or ``AutoTokenizer``."""
    from transformers import AutoProcessor, AutoTokenizer

    if fam.processor == "processor":
        return AutoProcessor.from_pretrained(model_path)
    return AutoTokenizer.from_pretrained(model_path)


def image_side(image_size: int, processor: Any, fam: Family | None = None) -> int:
    """``image_size`` rounded to ``fam``'s image grid (no family: the patch x merge rule)."""
    rule = fam.image_grid if fam is not None and fam.image_grid is not None else patch_merge_grid
    factor = rule(getattr(processor, "image_processor", None))
    return max(factor, round(image_size / factor) * factor)


def is_vision_module(name: str, fam: Family | None = None) -> bool:
    """Whether the dotted module name lies in ``fam``'s vision tower or projector (no family:
    any family's, or another VLM's common names)."""
    keys = fam.vision_modules if fam is not None and fam.vision_modules else ALL_VISION_MODULES
    return any(part in keys for part in name.split("."))
