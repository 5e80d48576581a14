"""Item summaries (stage 1 of MLLM-MSR): item images and titles -> textual item summaries.

``items/`` -> ``item_summaries/`` (schema :data:`~mllm_msr.data.schema.ITEM_SUMMARIES`) and
``quarantine/item_summaries/``.

How an item is summarized (:func:`summarize_items`):

* each image (only the first one when ``multi_image: first``) is described by the multimodal
  LLM from the image and the item title (:func:`mllm_msr.prompts.item_summary_messages`);
* with ``multi_image: per_image_fusion``, an item with several images then gets one text prompt
  that fuses the ordered descriptions with the title and text
  (:func:`mllm_msr.prompts.item_fusion_messages`);
* an item without images is summarized from its title and text
  (:func:`mllm_msr.prompts.item_text_summary_messages`);
* with ``item_summaries.enabled: false`` (the paper's "no image summaries" ablation) the summary
  is the title and no engine starts.

Rows that cannot be summarized go to ``quarantine/item_summaries/`` with a reason
(``corrupt_image``, ``empty_text``, ``empty_output``, ``engine_error``); none is dropped
silently.

Scale-out: a Ray Data ``map_batches`` over an actor pool of :class:`ItemSummarizer` (one vLLM
engine per actor; ``pool.concurrency`` actors, ``pool.num_gpus`` GPUs each, tensor parallelism
from the engine config). Image bytes stay inside the actors: each actor writes its batch's
summaries itself and returns one small row of counts.

Resumability and exactly-once output:

* A summary is keyed by :class:`SummaryKey` ``(item_id, image_hash, model, prompt_version)``.
  Items whose current key already has a summary (or a quarantine row) are skipped.
* Each batch is written as one Parquet file whose name is a hash of the batch's keys, through a
  temporary file and a rename. A retried batch (actor killed, task retried) rewrites the same
  file; a rerun after a crash sees the finished batches and only does the rest.
* :func:`reconcile` runs before and after the work: it drops rows whose key is stale (changed
  image, model or prompt version) or duplicated, so the final table holds each item once.
* When every item is summarized or quarantined the stage writes its marker; a rerun after that
  does nothing.

Fault injection (tests): when ``MLLM_MSR_FAULT_ITEM_SUMMARIES=<item_id>`` is set in the driver's
environment, the actor that processes the batch holding that item kills its own process right
after writing the batch (once per run directory), so Ray restarts the actor and retries the task.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_msr import prompts
from mllm_msr.config import ItemSummariesConfig, PipelineConfig
from mllm_msr.data import schema
from mllm_msr.runtime import RunDir, WallSpan, init_ray, node_cache_dir

_log = logging.getLogger(__name__)
STAGE = "item_summaries"
OUTPUT = "item_summaries"
QUARANTINE = f"quarantine/{STAGE}"
TITLE_MODEL = "title"
"""``model`` recorded when summaries are titles (``enabled: false``)."""
TITLE_PROMPT_VERSION = "title/v1"
FAULT_ENV = "MLLM_MSR_FAULT_ITEM_SUMMARIES"
HOLD_ENV = "MLLM_MSR_HOLD_ITEM_SUMMARIES_S"
"""Fault injection (tests): seconds an actor pauses once, after writing its first batch, so a
test can remove its node while the stage runs (:meth:`ItemSummarizer._maybe_hold`)."""
INPUT_COLUMNS = ["item_id", "title", "text", "images", "image_hash"]
"""Columns of ``items/`` the actors read (``image_hashes`` stays behind)."""
KEY_COLUMNS = ["item_id", "image_hash", "model", "prompt_version"]

Generate = Callable[[list[prompts.Chat]], list[Any]]
"""``chats -> generations`` (objects with ``text``, ``prompt_tokens``, ``output_tokens``)."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, order=True)
class SummaryKey:
    """What a summary depends on: a changed image, model or prompt makes a new summary."""

    item_id: str
    image_hash: str
    model: str
    prompt_version: str

    def token(self) -> str:
        return "\t".join((self.item_id, self.image_hash, self.model, self.prompt_version))


def model_name(cfg: ItemSummariesConfig) -> str:
    """The ``model`` recorded with the summaries of ``cfg``: the model id and a digest of the
    generation settings that shape the text (dtype, image resolution, sampling), so that a
    changed setting makes new summaries instead of reusing the old ones."""
    if not cfg.enabled:
        return TITLE_MODEL
    e, s = cfg.engine, cfg.sampling
    settings = [e.family, e.dtype, e.image_max_pixels, e.max_model_len, e.limit_images_per_prompt]
    settings += [s.max_new_tokens, s.temperature, s.top_p, s.seed, s.repetition_penalty]
    settings += [cfg.multi_image]
    digest = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:10]
    return f"{e.model}@{digest}"


def item_prompt_version(n_images: int, cfg: ItemSummariesConfig) -> str:
    """Version of the prompt(s) that summarize an item with ``n_images`` images under ``cfg``."""
    if not cfg.enabled:
        return TITLE_PROMPT_VERSION
    if n_images == 0:
        return prompts.prompt_version("item_text_summary")
    version = prompts.prompt_version("item_summary")
    if n_images > 1 and cfg.multi_image == "per_image_fusion":
        version += "+" + prompts.prompt_version("item_fusion")
    return version


def item_key(item_id: str, image_hash: str | None, n_images: int, cfg: ItemSummariesConfig):
    """The :class:`SummaryKey` of one item under ``cfg``."""
    return SummaryKey(
        item_id, image_hash or "", model_name(cfg), item_prompt_version(n_images, cfg)
    )


def expected_keys(items: pa.Table, cfg: ItemSummariesConfig) -> dict[str, SummaryKey]:
    """Item id -> its current key, from ``items/`` columns ``item_id, image_hashes, image_hash``.

    The first row of a duplicated item id wins (ingest keeps ids unique).
    """
    out: dict[str, SummaryKey] = {}
    ids = items.column("item_id").to_pylist()
    hashes = items.column("image_hash").to_pylist()
    counts = pc.list_value_length(items.column("image_hashes")).fill_null(0).to_pylist()
    for item_id, image_hash, n in zip(ids, hashes, counts):
        if item_id not in out:
            out[item_id] = item_key(item_id, image_hash, n, cfg)
    return out


def part_name(keys: Iterable[SummaryKey]) -> str:
    """Deterministic file name of the batch holding ``keys`` (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(k.token() for k in keys)).encode()).hexdigest()
    return f"part-{digest[:24]}"


# --------------------------------------------------------------------------- quarantine rows


def quarantine_row(key: SummaryKey, reason: str, detail: str) -> dict[str, str]:
    """A ``QUARANTINE`` row; the key is appended to ``detail`` so reruns can skip the item."""
    payload = json.dumps([key.image_hash, key.model, key.prompt_version])
    return schema.quarantine_row(STAGE, "items", key.item_id, reason, f"{detail} key={payload}")


def quarantine_key(row: dict[str, Any]) -> SummaryKey | None:
    """The :class:`SummaryKey` stored in a quarantine row by :func:`quarantine_row`."""
    detail = row.get("detail") or ""
    if " key=" not in detail:
        return None
    try:
        image_hash, model, version = json.loads(detail.rsplit(" key=", 1)[1])
    except (ValueError, TypeError):
        return None
    return SummaryKey(row["key"], image_hash, model, version)


# --------------------------------------------------------------------------- summarizing


@dataclass
class BatchResult:
    """Summaries (``ITEM_SUMMARIES`` rows) and quarantine rows of one batch."""

    summaries: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)


def decode_image(data: bytes):
    """Decode image bytes into an RGB PIL image (raises on corrupt data)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


@dataclass
class _Pending:
    """An item on its way through the engine calls of one batch."""

    key: SummaryKey
    title: str
    text: str
    fuse: bool = False
    descriptions: list[str] = field(default_factory=list)
    summary: str = ""
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0

    def count(self, gen: Any) -> None:
        self.prompt_tokens += gen.prompt_tokens
        self.output_tokens += gen.output_tokens


def generate_each(generate: Generate, chats: list[prompts.Chat]) -> list[Any]:
    """``generate(chats)``; when the batch fails, each chat alone, errors returned in place.

    A bad request (e.g. a prompt longer than ``max_model_len``) then fails alone instead of
    failing its batch forever. When every chat fails alone too, the engine itself is broken and
    the first error is raised.
    """
    if not chats:
        return []
    try:
        return list(generate(chats))
    except Exception:  # noqa: BLE001 - retried one by one below
        pass
    out: list[Any] = []
    for chat in chats:
        try:
            out.extend(generate([chat]))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    if all(isinstance(o, Exception) for o in out):
        raise out[0]
    return out


def summarize_items(
    rows: Sequence[dict[str, Any]], generate: Generate, cfg: ItemSummariesConfig
) -> BatchResult:
    """Summarize a batch of ``items/`` rows with (normally) two engine calls.

    Call 1 holds every image prompt and every text-only prompt of the batch; call 2 the fusion
    prompts of the items with several images (``per_image_fusion``). Quarantine reasons:
    ``corrupt_image``, ``empty_text`` (nothing to summarize), ``empty_output``,
    ``engine_error`` (the engine rejected the item's prompt).
    """
    result = BatchResult()
    pending: list[_Pending] = []
    calls: list[tuple[_Pending, prompts.Chat]] = []
    for row in rows:
        images = list(row.get("images") or [])
        key = item_key(row["item_id"], row.get("image_hash"), len(images), cfg)
        item = _Pending(key, (row.get("title") or "").strip(), (row.get("text") or "").strip())
        if cfg.multi_image == "first":
            images = images[:1]
        if images:
            try:
                pil = [decode_image(data) for data in images]
            except Exception as exc:  # noqa: BLE001 - any decoder error is a corrupt image
                detail = f"{type(exc).__name__}: {exc}"[:300]
                result.quarantine.append(quarantine_row(key, "corrupt_image", detail))
                continue
            item.fuse = len(pil) > 1
            calls += [(item, prompts.item_summary_messages(im, item.title or None)) for im in pil]
        elif item.title or item.text:
            calls.append((item, prompts.item_text_summary_messages(item.title, item.text)))
        else:
            result.quarantine.append(quarantine_row(key, "empty_text", "no image, title or text"))
            continue
        pending.append(item)

    for (item, _), gen in zip(calls, generate_each(generate, [chat for _, chat in calls])):
        if isinstance(gen, Exception):
            item.error = item.error or f"{type(gen).__name__}: {gen}"[:300]
            continue
        item.descriptions.append(gen.text.strip())
        item.count(gen)
    to_fuse = [it for it in pending if it.fuse and not it.error and all(it.descriptions)]
    fusion = [prompts.item_fusion_messages(it.descriptions, it.title, it.text) for it in to_fuse]
    for item, gen in zip(to_fuse, generate_each(generate, fusion)):
        if isinstance(gen, Exception):
            item.error = f"{type(gen).__name__}: {gen}"[:300]
            continue
        item.summary = gen.text.strip()
        item.count(gen)

    for item in pending:
        summary = item.summary if item.fuse else (item.descriptions or [""])[0]
        if item.error:
            result.quarantine.append(quarantine_row(item.key, "engine_error", item.error))
        elif not summary:
            empty = sum(1 for d in item.descriptions if not d)
            detail = (
                f"{empty} of {len(item.descriptions)} image descriptions empty"
                if empty
                else "the model returned an empty summary"
            )
            result.quarantine.append(quarantine_row(item.key, "empty_output", detail))
        else:
            result.summaries.append(
                {
                    "item_id": item.key.item_id,
                    "summary": summary,
                    "image_hash": item.key.image_hash,
                    "model": item.key.model,
                    "prompt_version": item.key.prompt_version,
                    "prompt_tokens": item.prompt_tokens,
                    "output_tokens": item.output_tokens,
                }
            )
    return result


def title_summaries(rows: Sequence[dict[str, Any]], cfg: ItemSummariesConfig) -> BatchResult:
    """The no-image-summary ablation: each item's summary is its title (no engine)."""
    result = BatchResult()
    for row in rows:
        key = item_key(row["item_id"], row.get("image_hash"), len(row.get("images") or []), cfg)
        title = (row.get("title") or "").strip()
        if not title:
            result.quarantine.append(quarantine_row(key, "empty_text", "no title"))
            continue
        result.summaries.append(
            {
                "item_id": key.item_id,
                "summary": title,
                "image_hash": key.image_hash,
                "model": key.model,
                "prompt_version": key.prompt_version,
                "prompt_tokens": 0,
                "output_tokens": 0,
            }
        )
    return result


# --------------------------------------------------------------------------- output files


def write_batch(run: RunDir, name: str, result: BatchResult) -> None:
    """Persist one batch: quarantine rows first, then summaries (see :func:`reconcile`)."""
    if result.quarantine:
        table = pa.Table.from_pylist(result.quarantine, schema=schema.QUARANTINE)
        run.write_table(QUARANTINE, table, name)
    if result.summaries:
        table = pa.Table.from_pylist(result.summaries, schema=schema.ITEM_SUMMARIES)
        run.write_table(OUTPUT, table, name)


@dataclass
class OutputState:
    """What :func:`reconcile` found: item ids summarized / quarantined under their current key."""

    summarized: set[str]
    quarantined: set[str]
    dropped: int
    """Stale or duplicate rows removed."""

    @property
    def done(self) -> set[str]:
        return self.summarized | self.quarantined


def _rewrite(run: RunDir, path: str, keep: list[bool]) -> None:
    """Rewrite the Parquet file ``path`` with only the rows flagged in ``keep``."""
    kept = pq.read_table(path, filesystem=run.fs).filter(pa.array(keep, pa.bool_()))
    if kept.num_rows == 0:
        run.fs.delete_file(path)
        return
    run.write_parquet_at(path, kept)


def reconcile(
    run: RunDir, expected: dict[str, SummaryKey], prune: bool = True, keep_only=None
) -> OutputState:
    """Keep, per item, one summary or one quarantine row matching its current key.

    Rows of items no longer in ``items/``, of a changed image hash, of another model or prompt
    version, and second copies of an item are removed (each file rewritten atomically). A summary
    wins over a quarantine row of the same item. ``prune=False`` only reports (nothing is
    deleted before its replacement exists: the stage prunes after its work). ``keep_only``, a
    set of file paths, treats rows of every other file as stale (``fresh``: the files this run
    wrote replace all earlier ones).
    """
    summarized: set[str] = set()
    dropped = 0
    for path in run.table_files(OUTPUT):
        keep = []
        current = keep_only is None or path in keep_only
        for row in pq.read_table(path, columns=KEY_COLUMNS, filesystem=run.fs).to_pylist():
            key = SummaryKey(**row)
            ok = current and expected.get(key.item_id) == key and key.item_id not in summarized
            if ok:
                summarized.add(key.item_id)
            keep.append(ok)
        if not all(keep):
            dropped += keep.count(False)
            if prune:
                _rewrite(run, path, keep)
    quarantined: set[str] = set()
    for path in run.table_files(QUARANTINE):
        keep = []
        current = keep_only is None or path in keep_only
        for row in pq.read_table(path, columns=["key", "detail"], filesystem=run.fs).to_pylist():
            key = quarantine_key(row)
            ok = (
                current
                and key is not None
                and expected.get(key.item_id) == key
                and key.item_id not in summarized
                and key.item_id not in quarantined
            )
            if ok:
                quarantined.add(key.item_id)
            keep.append(ok)
        if not all(keep):
            dropped += keep.count(False)
            if prune:
                _rewrite(run, path, keep)
    return OutputState(summarized, quarantined, dropped)


def read_item_summaries(run: RunDir, columns: list[str] | None = None) -> pa.Table:
    """The ``item_summaries/`` table (one row per item once the stage is complete)."""
    if not run.table_files(OUTPUT):
        return schema.empty(schema.ITEM_SUMMARIES)
    return run.read_table(OUTPUT, columns=columns)


def _written_since(run: RunDir, path: str, since: float) -> bool:
    mtime = run.fs.get_file_info(path).mtime
    return mtime is not None and mtime.timestamp() >= since - 1.0


def check_engine_model(cfg: ItemSummariesConfig, cache_dir: str) -> None:
    """Fail before any work (and any deletion) when the engine's model cannot be found."""
    from mllm_msr.model_source import is_source, read_manifest
    from mllm_msr.tiny import resolve_model

    if is_source(cfg.engine.model):  # each actor's node syncs it: only check it is published
        try:
            read_manifest(cfg.engine.model)
        except (OSError, ValueError) as exc:
            raise ValueError(f"item_summaries.engine.model: {exc}") from exc
        return
    try:
        path = resolve_model(cfg.engine.model, str(Path(cache_dir).absolute()))
    except Exception as exc:
        raise ValueError(
            f"item_summaries.engine.model={cfg.engine.model!r} cannot be loaded: {exc}"
        ) from exc
    looks_local = str(path).startswith(("/", "./", "../", "~"))
    if looks_local and not Path(path).expanduser().exists():
        raise ValueError(f"item_summaries.engine.model={cfg.engine.model!r}: {path} does not exist")


# --------------------------------------------------------------------------- actors


class ItemSummarizer:
    """Ray Data callable class: owns one vLLM engine, summarizes and writes batches of items.

    Returns one row per batch: ``part, rows_in, rows_out, quarantined, seconds, started_at,
    finished_at`` (wall-clock times, for the stage's active throughput), ``node_id``.
    """

    def __init__(
        self,
        cfg: ItemSummariesConfig,
        run_uri: str,
        cache_dir: str,
        crash_on_item: str | None = None,
        hold_s: float | None = None,
    ) -> None:
        from mllm_msr.engines.vllm import VLLMEngine

        self.cfg = cfg
        self.run = RunDir(run_uri)
        self.crash_on_item = crash_on_item
        self.hold_s = hold_s
        self.engine = VLLMEngine(cfg.engine, cache_dir)
        self.batches = 0

    def _generate(self, chats: list[prompts.Chat]) -> list[Any]:
        return self.engine.generate(chats, self.cfg.sampling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started_at = time.time()
        t0 = time.perf_counter()
        rows = batch.select(INPUT_COLUMNS).to_pylist()
        del batch
        keys = [
            item_key(r["item_id"], r["image_hash"], len(r["images"] or []), self.cfg) for r in rows
        ]
        name = part_name(keys)
        result = summarize_items(rows, self._generate, self.cfg)
        write_batch(self.run, name, result)
        self._maybe_crash(rows)
        self._maybe_hold()
        seconds = time.perf_counter() - t0
        self.batches += 1
        _log.debug(
            "actor pid=%d batch %d: %d items -> %d summaries, %d quarantined in %.2f s (%s)",
            os.getpid(),
            self.batches,
            len(rows),
            len(result.summaries),
            len(result.quarantine),
            seconds,
            name,
        )
        return pa.table(
            {
                "part": [name],
                "rows_in": [len(rows)],
                "rows_out": [len(result.summaries)],
                "quarantined": [len(result.quarantine)],
                "seconds": [seconds],
                "started_at": [started_at],
                "finished_at": [time.time()],
                "node_id": [_node_id()],
            }
        )

    def _maybe_hold(self) -> None:
        """Fault injection: after its first written batch, pause once per run (a flag file)."""
        marker = f"_faults/{STAGE}-hold"
        if not self.hold_s or self.run.exists(marker):
            return
        self.run.write_json(marker, {"pid": os.getpid(), "seconds": self.hold_s})
        print(f"[{STAGE}] holding {self.hold_s:g} s after the first batch", flush=True)
        time.sleep(self.hold_s)

    def _maybe_crash(self, rows: list[dict[str, Any]]) -> None:
        """Fault injection: kill this actor once, after writing the batch holding the item."""
        if self.crash_on_item is None:
            return
        if not any(r["item_id"] == self.crash_on_item for r in rows):
            return
        marker = f"_faults/{STAGE}-{hashlib.sha256(self.crash_on_item.encode()).hexdigest()[:16]}"
        if self.run.exists(marker):
            return
        self.run.write_json(marker, {"item_id": self.crash_on_item, "pid": os.getpid()})
        print(f"[{STAGE}] fault injection: killing actor pid={os.getpid()}", flush=True)
        os._exit(1)


def _node_id() -> str:
    """The Ray node this process runs on ('' outside Ray): the stage summary's ``nodes``."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


# --------------------------------------------------------------------------- driver


def _summarize_in_driver(run: RunDir, todo: set[str], cfg: ItemSummariesConfig, log) -> int:
    """The ablation path (titles as summaries): no engine, no image bytes read."""
    items = run.read_table("items", columns=["item_id", "title", "image_hash", "image_hashes"])
    rows = [r for r in items.to_pylist() if r["item_id"] in todo]
    rows = [{**r, "images": r["image_hashes"] or []} for r in rows]  # only the count matters
    size = max(1, cfg.pool.batch_size)
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        keys = [item_key(r["item_id"], r["image_hash"], len(r["images"]), cfg) for r in batch]
        write_batch(run, part_name(keys), title_summaries(batch, cfg))
    log(f"[{STAGE}] titles as summaries for {len(rows)} items (enabled=false)")
    return len(rows)


def _summarize_with_ray(
    cfg: PipelineConfig, run: RunDir, todo: set[str], n_items: int, log
) -> dict[str, float]:
    """Map :class:`ItemSummarizer` actors over the items still to do.

    Returns ``processed`` (items) and ``active_seconds``: from the start of the first batch to
    the end of the last one (engine start-up and Ray Data planning excluded).
    """
    import ray
    from ray.data.expressions import col

    s = cfg.item_summaries
    init_ray(
        cfg.ray.address,
        cfg.ray.num_cpus,
        cfg.ray.object_store_memory,
        hf_hub_offline=cfg.hf_hub_offline,
    )
    ds = ray.data.read_parquet(run.uri_of("items"), columns=INPUT_COLUMNS)
    if len(todo) < n_items:
        ds = ds.filter(expr=col("item_id").is_in(sorted(todo)))
    ds = ds.repartition(target_num_rows_per_block=s.pool.batch_size)
    num_gpus = s.pool.num_gpus
    if num_gpus > 0:  # an engine with tensor parallelism needs all its GPUs in its actor
        num_gpus = max(num_gpus, float(s.engine.tensor_parallel_size))
    cpus = ray.cluster_resources().get("CPU", 0)
    if s.pool.concurrency * s.pool.num_cpus >= cpus:
        log(
            f"[{STAGE}] warning: {s.pool.concurrency} actors x {s.pool.num_cpus} CPUs take all "
            f"{cpus:g} CPUs of the cluster; reading items needs CPUs too (lower pool.num_cpus)"
        )
    crash_on = os.environ.get(FAULT_ENV) or None
    ds = ds.map_batches(
        ItemSummarizer,
        fn_constructor_kwargs={
            "cfg": s,
            "run_uri": run.uri,
            "cache_dir": node_cache_dir(cfg.cache_dir),
            "crash_on_item": crash_on,
            "hold_s": float(os.environ.get(HOLD_ENV) or 0) or None,
        },
        batch_size=s.pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=s.pool.concurrency),
        num_cpus=s.pool.num_cpus,
        num_gpus=num_gpus,
        **({"resources": dict(s.pool.resources)} if s.pool.resources else {}),
    )
    # Fault tolerance comes from Ray Data's actor-pool defaults (``max_restarts=-1``,
    # ``max_task_retries=-1``; Ray 2.60 deprecates passing them here): a dead actor is restarted
    # and its unfinished batch retried. Batch files are idempotent, so a retry never duplicates.
    from mllm_msr.progress import Progress

    processed, span, nodes = 0, WallSpan(), set()
    progress = Progress(STAGE, total=len(todo), unit="items", write=None if log is print else log)
    for row in ds.iter_rows():
        processed += row["rows_in"]
        span.add(row["started_at"], row["finished_at"])
        nodes.add(row["node_id"])
        progress.set(processed)
        _log.debug(
            "batch %s: %d summarized, %d quarantined (%.2f s)",
            row["part"],
            row["rows_out"],
            row["quarantined"],
            row["seconds"],
        )
    progress.close()
    return {
        "processed": processed,
        "active_seconds": span.seconds,
        "nodes": sorted(nodes),
    }


def run_item_summaries(cfg: PipelineConfig, run: RunDir, log=print, fresh: bool = False) -> dict:
    """Run the item-summaries stage (the pipeline decides when); returns its summary.

    Items whose current key already has a summary are kept; ``fresh`` summarizes every item
    again. Stale rows (and, when fresh, every earlier file) are removed only after the new rows
    are written, and the engine's model is resolved before any work, so a failing run never
    loses valid summaries.

    Summary keys: ``rows_in`` (items), ``rows_out`` (summaries), ``quarantined``, ``skipped``
    (items already summarized before this run), ``summarized`` (items done by this run),
    ``dropped`` (stale/duplicate rows removed), ``seconds``, ``items_per_s`` (over the work
    phase, engine start-up included) and ``active_items_per_s`` (first batch start to last
    batch end: engine start-up excluded).
    """
    t0 = time.perf_counter()
    t_start = time.time()
    s = cfg.item_summaries
    files = run.table_files("items")
    if not files:
        raise FileNotFoundError(f"{STAGE}: no items/ table in {run.uri}; run ingest first")
    schema.check_columns(pq.read_schema(files[0], filesystem=run.fs).names, schema.ITEMS, "items/")
    items = run.read_table("items", columns=["item_id", "image_hashes", "image_hash"])
    expected = expected_keys(items, s)
    duplicates = items.num_rows - len(expected)
    if duplicates:
        log(f"[{STAGE}] warning: {duplicates} duplicate item id rows in items/; first kept")
    if s.enabled:
        check_engine_model(s, cfg.cache_dir)
    before = set(run.table_files(OUTPUT)) | set(run.table_files(QUARANTINE))
    state = reconcile(run, expected, prune=False)
    if fresh:
        state = OutputState(set(), set(), state.dropped)
    todo = set(expected) - state.done
    log(
        f"[{STAGE}] {len(expected)} items: {len(state.done)} already done, {len(todo)} to "
        f"summarize (model={model_name(s)}, multi_image={s.multi_image}, "
        f"dropped {state.dropped} stale rows)"
    )
    t_work = time.perf_counter()
    active_seconds, nodes = None, []
    if todo:
        if s.enabled:
            stats = _summarize_with_ray(cfg, run, todo, len(expected), log)
            active_seconds, nodes = stats["active_seconds"], stats["nodes"]
        else:
            _summarize_in_driver(run, todo, s, log)
    work_seconds = time.perf_counter() - t_work
    keep_only = None
    if fresh:  # this run's files replace all earlier ones (same names were rewritten)
        now = set(run.table_files(OUTPUT)) | set(run.table_files(QUARANTINE))
        rewritten = {p for p in now if p not in before or _written_since(run, p, t_start)}
        keep_only = rewritten
    final = reconcile(run, expected, keep_only=keep_only)
    missing = set(expected) - final.done
    if missing:
        raise RuntimeError(
            f"{STAGE}: {len(missing)} items neither summarized nor quarantined "
            f"(e.g. {sorted(missing)[:5]}); rerun to finish"
        )
    summary = {
        "rows_in": items.num_rows,
        "rows_out": len(final.summarized),
        "quarantined": len(final.quarantined),
        "duplicate_rows": duplicates,
        "skipped": len(state.done),
        "summarized": len(todo),
        "dropped": state.dropped + final.dropped,
        "model": model_name(s),
        "multi_image": s.multi_image,
        "work_seconds": round(work_seconds, 3),
        "items_per_s": round(len(todo) / work_seconds, 3) if todo and work_seconds > 0 else None,
        "active_seconds": None if active_seconds is None else round(active_seconds, 3),
        "active_items_per_s": (
            round(len(todo) / active_seconds, 3) if todo and active_seconds else None
        ),
        "seconds": round(time.perf_counter() - t0, 3),
        "nodes": nodes,
    }
    log(
        f"[{STAGE}] done: {summary['rows_out']} summaries, {summary['quarantined']} quarantined, "
        f"{summary['skipped']} skipped, {summary['seconds']:.1f} s"
    )
    return summary
