"""What an ingest adapter hands to the common pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Sources:
    """Raw datasets of one dataset layout (see :mod:`mllm_msr.data.ingest.common`)."""

    items: Any
    """Ray Dataset of ``RAW_ITEM_ROWS`` (image references, not bytes)."""
    interactions: Any
    """Ray Dataset of ``INTERACTION_ROWS``."""
    image_root: str | None
    """Folder local image references are resolved under (escapes refused)."""
    image_source: str
    """Name recorded as the source of image rejections."""
    items_file: str
    interactions_file: str
    final: bool = False
    """True when ``items`` are already ``ITEM_ROWS`` and interactions unique (the demo)."""
