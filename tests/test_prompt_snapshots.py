"""Snapshot hash per prompt version: a template's wording cannot change without a version bump.

Stages record ``PROMPT_VERSIONS[name]`` next to every output and reuse cached outputs of the same
version, so editing a template without bumping its version silently mixes two wordings. Each
template is rendered here for fixed inputs (including text the sanitizer rewrites) and the
sha256 of the rendering is pinned per version string. When a test here fails:

* you changed a template on purpose: bump its version in ``mllm_msr/prompts.py``
  (``PROMPT_VERSIONS``, e.g. ``recommender/v1`` -> ``recommender/v2``) and put the new version
  with the hash printed in the failure message into ``SNAPSHOTS`` below;
* you did not mean to change the wording: undo the change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from mllm_msr import prompts

TITLE = "Red <|im_start|>Car [INST] chase"
TEXT = "A short text\x07 about\n\n\n\nthe item."
BLOCK = [
    {"title": "First <image> item", "summary": "a red car on a road"},
    {"title": "Second item", "summary": None},
    {"title": "Third item", "summary": "a blue sky over the sea"},
]

RENDER: dict[str, Callable[[], list[prompts.Chat]]] = {
    "item_summary": lambda: [
        prompts.item_summary_messages(None, TITLE, "video"),
        prompts.item_summary_messages(None),
    ],
    "item_fusion": lambda: [
        prompts.item_fusion_messages(["desc one", "desc two"], TITLE, TEXT, "product"),
        prompts.item_fusion_messages(["only desc"]),
    ],
    "item_text_summary": lambda: [
        prompts.item_text_summary_messages(TITLE, TEXT, "video"),
        prompts.item_text_summary_messages(None),
    ],
    "preference_recurrent": lambda: [
        prompts.preference_messages(None, BLOCK, "video"),
        prompts.preference_messages("likes red <|eot_id|> cars", BLOCK, "item"),
    ],
    "preference_direct": lambda: [prompts.direct_preference_messages(BLOCK, "video")],
    "recommender": lambda: [
        prompts.recommender_messages("likes red cars", TITLE, "a red car", True, None, "video"),
        prompts.recommender_messages(None, TITLE, None, False),
        [*prompts.user_text("x"), {"role": "assistant", "content": prompts.answer_text(1)}],
        [{"role": "assistant", "content": prompts.answer_text(0)}],
    ],
    "recommender_paper": lambda: [
        prompts.recommender_chat(
            "paper", "likes red cars", TITLE, "a red car", True, None, "video"
        ),
        prompts.recommender_chat("paper", None, TITLE, None, False, history_titles=["A", "B"]),
    ],
    "recommender_history": lambda: [
        prompts.recommender_chat(
            "history", "likes red", TITLE, "a red car", True, None, "video", [TITLE, "B", "C"], 2
        ),
        prompts.recommender_chat("history", None, TITLE, None, False, history_titles=[]),
    ],
}
"""Template name -> fixed renderings (every branch of the template)."""

SNAPSHOTS: dict[str, str] = {
    "item_fusion/v1": "b6c69ebf18692a794a2563bae6e430123ec99ab36a7cbb498f0e87e7406d7c5f",
    "item_summary/v1": "c9ca1ea772d08953ca761d6472a5ec6f8458e5f456af247300efef8465ad174b",
    "item_text_summary/v1": "84989d9e7c1716b03e051a944d18f558198cab0de9f3b1e71f9b49042926a65c",
    "preference_direct/v1": "4f9a2ce902d0691fab5c34a3f55f43863529522bfd6f195a90f86ac5282740be",
    "preference_recurrent/v1": "253e0f42a60a410ca47f6ae5e157ea578e5128b392a97ded141528ca5b57b3e9",
    "recommender/v1": "a643647a5ddc35086a5ba1bc957e118c244b730781f48d412b265ae582d68f5b",
    "recommender_history/v1": "076f5fc2db6b294dc7f72d71c939064e4e1506f7d9c5467bacd0b68977235aec",
    "recommender_paper/v1": "271be062eb68fa0b852312572721aea967201cd025fcf132a7b91263ca62cb42",
}
"""Prompt version -> sha256 of its renderings (``rendering_hash``)."""


def rendering_hash(name: str) -> str:
    chats = RENDER[name]()
    return hashlib.sha256(json.dumps(chats, sort_keys=True, default=repr).encode()).hexdigest()


def test_every_prompt_version_has_a_rendering_and_a_snapshot():
    assert sorted(RENDER) == sorted(prompts.PROMPT_VERSIONS), (
        "tests/test_prompt_snapshots.py: add a RENDER entry for every template in "
        "PROMPT_VERSIONS (and drop those of removed templates)"
    )


def test_template_wording_is_pinned_by_its_version():
    problems = []
    for name, version in sorted(prompts.PROMPT_VERSIONS.items()):
        got = rendering_hash(name)
        want = SNAPSHOTS.get(version)
        if want is None:
            problems.append(
                f"{version}: no snapshot; if this is a new version, add "
                f"SNAPSHOTS[{version!r}] = {got!r}"
            )
        elif got != want:
            problems.append(
                f"{version}: template {name!r} renders differently than when {version} was "
                f"recorded. Bump PROMPT_VERSIONS[{name!r}] in mllm_msr/prompts.py and record "
                f"the new version in tests/test_prompt_snapshots.py SNAPSHOTS with hash {got!r} "
                "(or undo the wording change)"
            )
    assert not problems, "\n".join(problems)
