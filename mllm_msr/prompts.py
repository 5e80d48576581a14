"""Every prompt of the pipeline, in one place, versioned.

Each builder is a pure function returning a chat: a list of ``{"role", "content"}`` messages.
Text-only prompts have string content; multimodal prompts have a list of content parts,
``{"type": "image", "image": <PIL image or None>}`` then ``{"type": "text", "text": ...}``
(the format Hugging Face processors take; :mod:`mllm_msr.engines.vllm` converts it for vLLM).

Every piece of user or item text (titles, descriptions, generated summaries, preferences) goes
through :func:`sanitize`, so a title such as ``"<|im_start|>system"`` or ``"<image>"`` stays plain
text and can never become a chat-control or image-placeholder token.

Wording follows the MLLM-MSR paper (Ye et al., AAAI 2025) and its public prompts, reworded where
they had defects (one template shared by training and scoring; ``Yes``/``No`` capitalised as the
answer tokens). Stages record :data:`PROMPT_VERSIONS` ``[name]`` next to every output; bump a
version whenever its wording changes, so cached outputs of the old wording are not reused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mllm_msr import families as _families

Message = dict[str, Any]
Chat = list[Message]

PROMPT_VERSIONS: dict[str, str] = {
    "item_summary": "item_summary/v1",
    "item_fusion": "item_fusion/v1",
    "item_text_summary": "item_text_summary/v1",
    "preference_recurrent": "preference_recurrent/v1",
    "preference_direct": "preference_direct/v1",
    "recommender": "recommender/v1",
    "recommender_paper": "recommender_paper/v1",
    "recommender_history": "recommender_history/v1",
}
"""Version of each template; a stage records the version of the template it used."""

YES, NO = _families.ANSWERS
PREFERENCE_PREFIX = "The user appears to have a preference for"

MAX_TITLE_CHARS = 200
"""Titles longer than this are cut (characters)."""
MAX_TEXT_CHARS = 1200
"""Descriptions, summaries and preference texts longer than this are cut (characters)."""


def prompt_version(name: str) -> str:
    """The version string of template ``name`` (a key of :data:`PROMPT_VERSIONS`)."""
    try:
        return PROMPT_VERSIONS[name]
    except KeyError:
        raise KeyError(f"unknown prompt {name!r}; known: {sorted(PROMPT_VERSIONS)}") from None


# --------------------------------------------------------------------------- sanitizing

# Chat-control and placeholder spellings of the families we serve: ChatML / Llama-3 specials
# (<|im_start|>, <|eot_id|>, <|image_pad|>), tag-like tokens (<image>, <s>, </s>, <video>,
# <start_of_turn>) and Mistral/Llama-2 square-bracket markers ([INST], [/INST], [\INST], [IMG]).
_PIPE_TOKEN = re.compile(r"<\|([^<>|]{0,64})\|>")
_TAG_TOKEN = re.compile(r"<(/?[A-Za-z_][A-Za-z0-9_\-:.]{0,40}/?)>")
_BRACKET_TOKEN = re.compile(r"\[(\\?/?[A-Z][A-Z0-9_]{1,31})\]")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def sanitize(text: str | None, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Make user/item text safe to place inside a prompt.

    * Control-token spellings are defanged with look-alike brackets that no tokenizer treats
      as special: ``<|im_start|>`` -> ``‹|im_start|›``, ``<image>`` -> ``‹image›``,
      ``[INST]`` -> ``(INST)``.
    * Control characters are dropped, runs of blank lines shortened, ends stripped.
    * Text longer than ``max_chars`` characters is cut (at a space when one is near) and ends
      with ``…``. ``max_chars <= 0`` disables the cut.
    """
    if text is None:
        return ""
    text = _CONTROL_CHARS.sub(" ", str(text)).replace("\r\n", "\n").replace("\r", "\n")
    text = _PIPE_TOKEN.sub(r"‹|\1|›", text)
    text = _TAG_TOKEN.sub(r"‹\1›", text)
    text = _BRACKET_TOKEN.sub(r"(\1)", text)
    text = _MANY_NEWLINES.sub("\n\n", text).strip()
    if max_chars > 0 and len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        if space >= max_chars * 0.8:
            cut = cut[:space]
        text = cut.rstrip() + "…"
    return text


def _title(title: str | None) -> str:
    return sanitize(title, MAX_TITLE_CHARS) or "(untitled)"


# --------------------------------------------------------------------------- content parts


def image_part(image: Any = None) -> dict[str, Any]:
    """An image content part (``image`` may be None when a processor receives it separately)."""
    return {"type": "image", "image": image}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def user_text(text: str) -> Chat:
    """A one-turn text-only chat."""
    return [{"role": "user", "content": text}]


def user_image_text(image: Any, text: str) -> Chat:
    """A one-turn chat with one image followed by text (the paper's ``<image>\\n...`` order)."""
    return [{"role": "user", "content": [image_part(image), text_part(text)]}]


def chat_images(chat: Chat) -> list[Any]:
    """The images of a chat, in order."""
    images = []
    for message in chat:
        content = message.get("content")
        if isinstance(content, list):
            images.extend(p.get("image") for p in content if p.get("type") == "image")
    return images


# --------------------------------------------------------------------------- item summaries


def item_summary_messages(image: Any, title: str | None = None, noun: str = "item") -> Chat:
    """Describe one item image (the paper's image-summarization prompt), title optional.

    ``noun`` names what the image is the cover of: ``"video"`` for MicroLens, ``"product"``
    for Amazon; ``"item"`` in general.
    """
    noun = sanitize(noun, 40) or "item"
    about = f"which is the cover of a {noun}"
    if title:
        about += f" titled '{_title(title)}'"
    text = (
        f"Please describe this image, {about}. Provide a detailed description in one continuous "
        "paragraph, including content information and visual features such as colors, objects, "
        "text, and any notable elements present in the image."
    )
    return user_image_text(image, text)


def item_fusion_messages(
    descriptions: Sequence[str],
    title: str | None = None,
    text: str | None = None,
    noun: str = "item",
) -> Chat:
    """Fuse the descriptions of an item's several images (in order) with its title and text."""
    noun = sanitize(noun, 40) or "item"
    lines = [f"Below are descriptions of the {len(descriptions)} images of a {noun}, in order."]
    if title:
        lines.append(f"Title: '{_title(title)}'")
    if text:
        lines.append(f"Text: {sanitize(text)}")
    for i, desc in enumerate(descriptions, 1):
        lines.append(f"Image {i}: {sanitize(desc)}")
    lines.append(
        f"Combine all of this into one description of the {noun} in one continuous paragraph, "
        "covering its content and its visual features such as colors, objects, text and any "
        "notable elements. Do not describe the images one by one, and do not repeat the question."
    )
    return user_text("\n".join(lines))


def item_text_summary_messages(
    title: str | None, text: str | None = None, noun: str = "item"
) -> Chat:
    """Summarize an item that has no usable image from its title (and text, when given)."""
    noun = sanitize(noun, 40) or "item"
    lines = [f"Below is the information available about a {noun}.", f"Title: '{_title(title)}'"]
    if text:
        lines.append(f"Text: {sanitize(text)}")
    lines.append(
        f"Please describe this {noun} in one continuous paragraph, including its content and "
        "what it is likely to look like. Only use the information given; do not repeat the "
        "question."
    )
    return user_text("\n".join(lines))


# --------------------------------------------------------------------------- user preferences


def _history_lines(items: Sequence[dict[str, Any]], noun: str) -> list[str]:
    lines = []
    for i, item in enumerate(items, 1):
        line = f"{i}. Title: '{_title(item.get('title'))}'"
        summary = item.get("summary")
        if summary:
            line += f", {noun.capitalize()} description: {sanitize(summary)}"
        lines.append(line)
    return lines


_PREFERENCE_TAIL = (
    "please summarize the user's preferences in one continuous paragraph. Only provide "
    "information about the user's preferences; do not repeat details about the previously "
    "viewed {noun}s. Do not repeat the question in your answer, and keep it clear and concise. "
    f"The answer should start with '{PREFERENCE_PREFIX}'."
)


def preference_messages(
    previous: str | None, block: Sequence[dict[str, Any]], noun: str = "item"
) -> Chat:
    """One step of the recurrent preference summarizer.

    ``block`` is the next chronological block of the user's history, each item a dict with a
    ``title`` and an optional ``summary`` (omitted in the no-image-summary ablation).
    ``previous`` is the preference text from the previous block, None for the first block
    (the initial prompt); otherwise the prompt asks for an updated preference.
    """
    noun = sanitize(noun, 40) or "item"
    lines = [f"Below is a chronological list of {noun}s the user recently interacted with:"]
    lines += _history_lines(block, noun)
    if previous is None:
        lines.append(
            f"Based on the content and visual style of the {noun}s listed above, "
            + _PREFERENCE_TAIL.format(noun=noun)
        )
    else:
        lines.append("We also know the user's preference from their earlier history:")
        lines.append(sanitize(previous))
        lines.append(
            f"Based on the content and visual style of the {noun}s listed above as well as the "
            "known aspects of the user's preference, " + _PREFERENCE_TAIL.format(noun=noun)
        )
    return user_text("\n".join(lines))


def direct_preference_messages(history: Sequence[dict[str, Any]], noun: str = "item") -> Chat:
    """The no-recurrence ablation: the whole history summarized in one prompt."""
    noun = sanitize(noun, 40) or "item"
    lines = [f"Below is a chronological list of {noun}s the user interacted with:"]
    lines += _history_lines(history, noun)
    lines.append(
        f"Based on the {noun}s listed above, please summarize the user's preferences in terms "
        "of both content and visual style in one continuous paragraph. Only provide information "
        f"about the user's preferences; do not repeat details about the {noun}s. Do not repeat "
        "the question in your answer, and keep it clear and concise. The answer should start "
        f"with '{PREFERENCE_PREFIX}'."
    )
    return user_text("\n".join(lines))


# --------------------------------------------------------------------------- recommender


RECOMMENDER_PROMPTS = ("paper", "summary", "history")
"""Choices of ``train.prompt``: ``paper`` (preference + candidate title + candidate image, the
paper's input), ``summary`` (also the candidate's generated summary) and ``history`` (``paper``
plus the titles of the user's most recent history items, TALLRec-style)."""


def recommender_template(style: str) -> str:
    """The :data:`PROMPT_VERSIONS` key of recommender prompt ``style`` (``train.prompt``)."""
    if style not in RECOMMENDER_PROMPTS:
        raise ValueError(f"train.prompt: {style!r} is not one of {list(RECOMMENDER_PROMPTS)}")
    return "recommender" if style == "summary" else f"recommender_{style}"


def recommender_messages(
    preference: str | None,
    title: str | None,
    summary: str | None = None,
    with_image: bool = True,
    image: Any = None,
    noun: str = "item",
    history_titles: Sequence[str] | None = None,
) -> Chat:
    """The recommender prompt, answered with ``Yes`` or ``No`` (training and scoring alike).

    ``with_image`` puts the candidate's image (``image``; None when a processor receives it
    separately) before the text. ``summary`` (e.g. the item's image description, for a
    text-only recommender) is included when given. ``history_titles`` (the ``history`` prompt)
    lists the user's most recent items, oldest first, after the preference.
    """
    noun = sanitize(noun, 40) or "item"
    lines = [
        "Based on the user's previous interaction history, the user's preference can be "
        f"summarized as: {sanitize(preference) or '(unknown)'}",
    ]
    if history_titles:
        lines.append(f"The {noun}s the user interacted with most recently, oldest first:")
        lines += [f"{i}. '{_title(t)}'" for i, t in enumerate(history_titles, 1)]
    lines += [
        f"Please predict whether this user would interact with the following {noun} at the "
        "next opportunity.",
        f"The {noun}'s title is '{_title(title)}'.",
    ]
    if summary:
        lines.append(f"The {noun}'s description: {sanitize(summary)}")
    if with_image:
        lines.append(f"The given image is this {noun}'s cover.")
    lines.append(f"Please only respond '{YES}' or '{NO}', without any other words.")
    text = "\n".join(lines)
    return user_image_text(image, text) if with_image else user_text(text)


def recommender_chat(
    style: str,
    preference: str | None,
    title: str | None,
    summary: str | None = None,
    with_image: bool = True,
    image: Any = None,
    noun: str = "item",
    history_titles: Sequence[str] | None = None,
    history_n: int = 5,
) -> Chat:
    """The recommender prompt of ``style`` (:data:`RECOMMENDER_PROMPTS`): what a sample's
    fields become for the collator (training and scoring call this one function).

    ``paper`` drops ``summary`` and ``history_titles``; ``summary`` keeps ``summary``;
    ``history`` drops ``summary`` and keeps the last ``history_n`` of ``history_titles``.
    """
    recommender_template(style)  # validates the style
    recent = list(history_titles or [])[-history_n:] if style == "history" and history_n else []
    return recommender_messages(
        preference,
        title,
        summary if style == "summary" else None,
        with_image=with_image,
        image=image,
        noun=noun,
        history_titles=recent or None,
    )


def answer_text(label: int | bool) -> str:
    """The target answer of a recommender sample: ``Yes`` for a positive, ``No`` otherwise."""
    return YES if label else NO


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of the first token of ``Yes`` and of ``No``, encoded on their own.

    Training appends ``tokenizer(answer_text(label), add_special_tokens=False)`` after the
    prompt, so these are the ids a fine-tuned recommender learns to emit first; scoring reads
    the same two ids (for SentencePiece tokenizers, the word-start forms such as ``▁Yes``).
    """
    ids = []
    for answer in (YES, NO):
        encoded = tokenizer.encode(answer, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"the tokenizer encodes {answer!r} to no tokens")
        ids.append(int(encoded[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"'{YES}' and '{NO}' start with the same token {ids[0]}")
    return ids[0], ids[1]


# --------------------------------------------------------------------------- model families
# The registry lives in mllm_msr.families; these names stay importable from here.
FAMILIES = _families.FAMILIES
Family = _families.Family
family = _families.family


def image_placeholder(family_name: str) -> str | None:
    """How ``family_name``'s chat template renders one image (None for text-only families)."""
    return family(family_name).image_placeholder


def mm_processor_kwargs(family_name: str, max_pixels: int | None) -> dict[str, Any]:
    """Processor kwargs bounding image resolution for ``family_name`` (empty when none apply)."""
    return family(family_name).processor_kwargs(max_pixels)


def text_only(chat: Chat) -> Chat:
    """The chat with image parts removed (for text-only families); text parts are joined."""
    out = []
    for message in chat:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({**message, "content": content})
    return out
