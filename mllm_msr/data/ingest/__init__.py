"""Ingest adapters: raw dataset layouts -> routed rows (see :mod:`.common`)."""

from __future__ import annotations

from collections.abc import Callable

from mllm_msr.config import IngestConfig
from mllm_msr.data.ingest.sources import Sources


def adapter(fmt: str) -> Callable[[IngestConfig], Sources]:
    """The function building the raw datasets of ``fmt`` (imports Ray Data lazily)."""
    if fmt == "microlens":
        from mllm_msr.data.ingest.microlens import microlens_sources as fn
    elif fmt == "amazon":
        from mllm_msr.data.ingest.amazon import amazon_sources as fn
    elif fmt == "generic":
        from mllm_msr.data.ingest.generic import generic_sources as fn
    elif fmt == "demo":
        from mllm_msr.data.ingest.demo import demo_sources as fn
    else:
        raise ValueError(f"unknown ingest format {fmt!r}")
    return fn


__all__ = ["Sources", "adapter"]
