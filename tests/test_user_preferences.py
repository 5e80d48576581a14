"""User-preferences stage: blocks, prompts, leakage guard, refresh rules, real vLLM on Ray.

Fast tests cover the pure parts (block splitting, prompts, planning, reuse of stored states)
the wavefront bookkeeping with a scripted ``generate``, and leakage through the engine path with
a scripted engine. Slow tests run the real vLLM engine on the tiny text Qwen2: determinism,
incremental refresh = full recomputation, and reruns that skip finished users.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm_msr import prompts
from mllm_msr.config import PipelineConfig, UserPreferencesConfig, config_from_dict
from mllm_msr.data import schema
from mllm_msr.runtime import RunDir
from mllm_msr.stages import user_preferences as stage
from mllm_msr.stages.user_preferences import HistoryItem, State, UserWork

REPO = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MLLM_MSR_CACHE", str(REPO / ".cache" / "mllm_msr"))


# --------------------------------------------------------------------------- data


def make_tables(
    n_users: int, n_items: int = 40, hist_len=lambda u: 3 + u % 7, seed: int = 0
) -> dict[str, pa.Table]:
    """Items, summaries and sequences. Every item summary carries a unique marker
    ``SUMMARY-<item>``; each user's target is an item that is not in their history."""
    items = [f"i{j:03d}" for j in range(n_items)]
    tables = {
        "items": pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "title": f"Title {i}",
                    "text": "",
                    "images": [],
                    "image_hashes": [],
                    "image_hash": "",
                }
                for i in items
            ],
            schema=schema.ITEMS,
        ),
        "item_summaries": pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "summary": f"SUMMARY-{i} a cover with red shapes",
                    "image_hash": "",
                    "model": "toy",
                    "prompt_version": "toy/v1",
                    "prompt_tokens": 1,
                    "output_tokens": 1,
                }
                for i in items
            ],
            schema=schema.ITEM_SUMMARIES,
        ),
    }
    seqs = []
    for u in range(n_users):
        rank = int(hashlib.sha256(f"{seed}-{u}".encode()).hexdigest(), 16)
        order = sorted(items, key=lambda i: hashlib.sha256(f"{rank}{i}".encode()).hexdigest())
        n = hist_len(u)
        seqs.append(
            {"user_id": f"u{u:03d}", "split": "train", "history": order[:n], "target": order[n]}
        )
    tables["sequences"] = pa.Table.from_pylist(seqs, schema=schema.SEQUENCES)
    return tables


def write_run(root: Path, tables: dict[str, pa.Table]) -> RunDir:
    run = RunDir(str(root))
    for name, table in tables.items():
        run.remove(name)
        run.write_table(name, table)
    return run


def scripted(calls: list[list[prompts.Chat]]):
    """A deterministic stand-in for the engine (fast tests only): answer = hash of the prompt."""

    def generate(chats, keys):
        calls.append(chats)
        return ["pref-" + hashlib.sha256(c[0]["content"].encode()).hexdigest()[:12] for c in chats]

    return generate


def up_config(**kw) -> UserPreferencesConfig:
    up = UserPreferencesConfig()
    for k, v in kw.items():
        setattr(up, k, v)
    return up


def _items(n: int) -> list[HistoryItem]:
    return [HistoryItem(f"i{j}", f"T{j}", f"S{j}") for j in range(n)]


# --------------------------------------------------------------------------- fast


def test_block_bounds_start_at_the_beginning_and_keep_a_partial_tail():
    assert stage.block_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert stage.block_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert stage.block_bounds(2, 3) == [(0, 2)]
    assert stage.block_bounds(0, 3) == []
    assert stage.block_bounds(8, 3, mode="direct") == [(0, 8)]
    with pytest.raises(ValueError):
        stage.block_bounds(3, 0)


def test_user_prompt_initial_update_direct_and_titles_only():
    block = _items(3)
    first = stage.user_prompt(None, block, "recurrent", "video")
    assert first == prompts.preference_messages(None, [b.prompt_view() for b in block], "video")
    text = first[0]["content"]
    assert all(f"T{j}" in text and f"S{j}" in text for j in range(3))
    assert "earlier history" not in text
    update = stage.user_prompt("likes red", block, "recurrent", "video")[0]["content"]
    assert "likes red" in update and "earlier history" in update
    direct = stage.user_prompt(None, _items(7), "direct", "item")[0]["content"]
    assert all(f"T{j}" in direct for j in range(7))
    titles_only = stage.user_prompt(None, [HistoryItem("i0", "T0")], "recurrent", "item")
    assert "description" not in titles_only[0]["content"]


def test_plan_never_puts_the_target_in_a_prompt():
    """No prompt sent for a user names their target (title or summary); every history item is
    shown. Prompts are read from the wavefront's trace, per user."""
    tables = make_tables(12)
    up = up_config(block_size=3)
    plan = stage.plan_users(
        tables["sequences"],
        {i: f"Title {i}" for i in tables["items"].column("item_id").to_pylist()},
        dict(
            zip(
                tables["item_summaries"].column("item_id").to_pylist(),
                tables["item_summaries"].column("summary").to_pylist(),
            )
        ),
        {},
        up,
    )
    works = [w for _, ws in plan.batches for w in ws]
    calls: list = []
    trace: dict[str, list] = {}
    chains, stats = stage.wavefront(works, scripted(calls), up, trace)
    assert stats.users == 12 and len(chains) == 12
    assert all(chains[w.user_id][-1].consumed == len(w.items) for w in works)
    # Every chat sent to the engine is in the trace of exactly one user.
    assert sum(len(chats) for chats in calls) == sum(len(t) for t in trace.values())
    for row in tables["sequences"].to_pylist():
        user, target = row["user_id"], row["target"]
        assert all(i.item_id != target for w in works if w.user_id == user for i in w.items)
        text = "\n".join(chat[0]["content"] for chat in trace[user])
        assert f"'Title {target}'" not in text and f"SUMMARY-{target} " not in text
        for item in row["history"]:
            assert f"'Title {item}'" in text and f"SUMMARY-{item} " in text
    # The check above can fail: a target placed in a history is seen in that user's prompts.
    leaky = UserWork("leak", [HistoryItem("i000", "Title i000", "SUMMARY-i000 a cover")])
    leak_trace: dict[str, list] = {}
    stage.wavefront([leaky], scripted([]), up, leak_trace)
    assert "SUMMARY-i000 " in leak_trace["leak"][0][0]["content"]


def test_wavefront_calls_the_engine_once_per_round_not_per_user():
    works = [UserWork(f"u{u}", _items(n)) for u, n in enumerate([2, 3, 7, 9, 9, 4])]
    up = up_config(block_size=3)
    calls: list = []
    chains, stats = stage.wavefront(works, scripted(calls), up)
    assert stats.engine_calls == 3 == len(calls)  # the longest history has 3 blocks
    assert [len(c) for c in calls] == [6, 4, 3]
    assert stats.blocks == sum(len(stage.block_bounds(len(w.items), 3)) for w in works)
    assert [s.consumed for s in chains["u2"]] == [3, 6, 7]
    assert [s.consumed for s in chains["u0"]] == [2]
    # The one-user-at-a-time loop (the reference code) gives the same states.
    seq_calls: list = []
    for w in works:
        single, _ = stage.wavefront([w], scripted(seq_calls), up)
        assert single[w.user_id] == chains[w.user_id]
    assert len(seq_calls) == stats.blocks


def test_continuous_feeding_gives_the_rounds_results_with_chains_advancing_on_their_own():
    """Continuous feeding sends the same prompts and builds the same states as the rounds; a
    user's next block is queued as soon as their previous one is answered, within the cap."""
    works = [UserWork(f"u{i}", _items(n)) for i, n in enumerate([9, 3, 7, 1, 6])]
    up = up_config(block_size=3)
    ref_trace: dict[str, list] = {}
    ref, ref_stats = stage.wavefront(works, scripted([]), up, ref_trace)

    class OneAtATime:
        """Answers the oldest request per poll: chains must advance independently."""

        def __init__(self):
            self.queue, self.peak, self.answer = [], 0, scripted([])

        @property
        def in_flight(self):
            return len(self.queue)

        def submit(self, key, chat):
            self.queue.append((key, chat))
            self.peak = max(self.peak, len(self.queue))

        def poll(self):
            key, chat = self.queue.pop(0)
            return [(key, self.answer([chat], [key])[0])]

    for cap in (0, 2):
        feeder, trace = OneAtATime(), {}
        chains, stats = stage.continuous_wavefront(
            works, feeder, up_config(block_size=3, max_in_flight=cap), trace
        )
        assert chains == ref and trace == ref_trace
        assert stats.blocks == ref_stats.blocks == 10 and stats.engine_calls == 10
        assert feeder.peak == (cap or len(works))
    # Through a GenerateFn (one call per poll) and run_recurrence's dispatch.
    calls: list = []
    chains, stats = stage.run_recurrence(works, up_config(block_size=3), scripted(calls))
    assert chains == ref and stats.engine_calls == len(calls) == 3
    chains, stats = stage.run_recurrence(
        works, up_config(block_size=3, feeding="rounds"), scripted([])
    )
    assert chains == ref and stats.engine_calls == 3


def test_continuous_feeding_falls_back_on_failed_and_empty_answers():
    works = [UserWork("a", _items(6)), UserWork("b", _items(3))]
    answers = {"a@3": None, "a@6": "", "b@3": "  "}

    def generate(chats, keys):
        return [answers[k] for k in keys]

    chains, stats = stage.continuous_wavefront(
        works, stage.generate_feeder(generate), up_config(block_size=3)
    )
    assert stats.engine_errors == 1 and stats.empty_outputs == 3
    assert chains["a"][0].text == stage.fallback_text(_items(3)) == chains["a"][1].text
    assert chains["b"][0].text == stage.fallback_text(_items(3))


def test_engine_threads_follow_the_config_then_the_process_cpus(monkeypatch):
    """engine.cpu_threads wins; else OMP_NUM_THREADS (what Ray gives an actor: its num_cpus);
    else every core the process may use (a plain process: why a bench engine and the stage's
    actor differed)."""
    from mllm_msr.config import EngineConfig
    from mllm_msr.engines.vllm import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(EngineConfig(cpu_threads=3)) == 3
    assert cpu_threads(EngineConfig()) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(EngineConfig()) == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(cpu_threads=-1)


def test_direct_mode_summarizes_the_whole_history_in_one_prompt():
    works = [UserWork(f"u{u}", _items(n)) for u, n in enumerate([2, 7, 10])]
    calls: list = []
    chains, stats = stage.wavefront(works, scripted(calls), up_config(mode="direct"))
    assert stats.engine_calls == 1 and [len(c) for c in calls] == [3]
    assert [[s.consumed for s in chains[w.user_id]] for w in works] == [[2], [7], [10]]
    assert "T9" in calls[0][2][0]["content"]


def test_empty_output_keeps_the_previous_state_or_falls_back_to_titles():
    works = [UserWork("a", _items(6)), UserWork("b", _items(2))]
    answers = iter([["first", ""], ["  "]])
    chains, stats = stage.wavefront(works, lambda c, k: next(answers), up_config(block_size=3))
    assert [s.text for s in chains["a"]] == ["first", "first"]
    assert chains["b"][0].text.startswith(prompts.PREFERENCE_PREFIX)
    assert "'T1'" in chains["b"][0].text
    assert stats.empty_outputs == 2 and stats.engine_errors == 0
    failed = iter([["first", None], [None]])
    chains, stats = stage.wavefront(works, lambda c, k: next(failed), up_config(block_size=3))
    assert [s.text for s in chains["a"]] == ["first", "first"]
    assert stats.engine_errors == 2


def test_reusable_states_follow_the_block_chain_rule():
    up = up_config(block_size=3)
    key = stage.settings_key(up)
    old = _items(8)
    chain, _ = stage.wavefront([UserWork("u", old)], scripted([]), up)
    stored = chain["u"]  # consumed 3, 6, 8 (partial tail)
    # Same history: everything is reused, nothing left to do.
    assert stage.reusable_states(old, stored, 3, "recurrent", key) == stored
    # Longer history: the partial-tail state is not on the new chain; restart from 6.
    longer = _items(11)
    assert [s.consumed for s in stage.reusable_states(longer, stored, 3, "recurrent", key)] == [
        3,
        6,
    ]
    # A changed item invalidates every state after it.
    changed = list(longer)
    changed[4] = HistoryItem("x", "X", "SX")
    assert [s.consumed for s in stage.reusable_states(changed, stored, 3, "recurrent", key)] == [3]
    # Other settings (block size, summaries shown or not) never reuse.
    other = stage.settings_key(up_config(block_size=3, use_item_summaries=False))
    assert stage.reusable_states(old, stored, 3, "recurrent", other) == []
    direct = stage.settings_key(up_config(block_size=3, mode="direct"))
    assert stage.reusable_states(old, stored, 3, "direct", direct) == []
    penalized = up_config(block_size=3)
    penalized.sampling.repetition_penalty = 1.1
    assert stage.reusable_states(old, stored, 3, "recurrent", stage.settings_key(penalized)) == []


def test_refresh_equals_recomputation_with_a_deterministic_generate():
    up = up_config(block_size=3)
    full, _ = stage.wavefront([UserWork("u", _items(11))], scripted([]), up)
    short, _ = stage.wavefront([UserWork("u", _items(8))], scripted([]), up)
    reused = stage.reusable_states(_items(11), short["u"], 3, "recurrent", stage.settings_key(up))
    calls: list = []
    refreshed, stats = stage.wavefront([UserWork("u", _items(11), reused)], scripted(calls), up)
    assert refreshed == full
    assert stats.blocks == 2  # items 6-8 and 9-10 only


def test_plan_quarantines_and_counts_explicitly():
    seqs = pa.Table.from_pylist(
        [
            {"user_id": "ok", "split": "train", "history": ["a", "b", "c", "d"], "target": "t"},
            {"user_id": "short", "split": "train", "history": ["a"], "target": "t"},
            {"user_id": "empty", "split": "train", "history": [], "target": "t"},
            {"user_id": "unknown", "split": "train", "history": ["a", "zz"], "target": "t"},
            {"user_id": "nosum", "split": "train", "history": ["a", "n"], "target": "t"},
            {"user_id": "ok", "split": "val", "history": ["a", "b", "c", "d", "e"], "target": "t"},
        ],
        schema=schema.SEQUENCES,
    )
    titles = {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E", "n": "N", "t": "T"}
    summaries = {k: f"sum {k}" for k in "abcdet"}
    plan = stage.plan_users(seqs, titles, summaries, {}, up_config(block_size=3))
    reasons = {q["key"]: q["reason"] for q in plan.quarantine}
    assert reasons == {
        "empty": "empty_history",
        "unknown": "unknown_item",
        "ok": "duplicate_user",
    }
    users = {w.user_id: w for _, ws in plan.batches for w in ws}
    assert sorted(users) == ["nosum", "ok", "short"]
    assert len(users["ok"].items) == 5  # of two sequences, the one with the latest target (val)
    assert users["nosum"].items[1] == HistoryItem("n", "N", "")
    assert plan.counts["items_without_summary"] == 1 and plan.counts["short_histories"] == 2
    assert plan.rows_in == len(users) + len(plan.quarantine)
    strict = stage.plan_users(
        seqs, titles, summaries, {}, up_config(block_size=3, missing_summary="quarantine")
    )
    assert {q["key"]: q["reason"] for q in strict.quarantine}["nosum"] == "missing_item_summary"
    titles_only = stage.plan_users(
        seqs, titles, {}, {}, up_config(block_size=3, use_item_summaries=False)
    )
    assert all(i.summary == "" for _, ws in titles_only.batches for w in ws for i in w.items)
    assert titles_only.counts["items_without_summary"] == 0


def test_stable_seeds_do_not_depend_on_batching():
    assert stage.stable_seed(0, "u1@3") == stage.stable_seed(0, "u1@3")
    assert stage.stable_seed(0, "u1@3") != stage.stable_seed(0, "u1@6")
    assert stage.stable_seed(0, "u1@3") != stage.stable_seed(1, "u1@3")
    assert 0 <= stage.stable_seed(5, "x") < 2**31


def test_part_names_are_deterministic_and_follow_the_inputs():
    key = stage.settings_key(up_config())
    a = [UserWork("u1", _items(4)), UserWork("u2", _items(5))]
    assert stage.part_name(a, key) == stage.part_name(
        [UserWork(w.user_id, w.items) for w in a], key
    )
    b = [UserWork("u1", _items(4)), UserWork("u2", _items(6))]
    assert stage.part_name(a, key) != stage.part_name(b, key)
    assert stage.part_name(a, key).startswith(stage.PART_PREFIX)


def test_user_work_round_trips_through_json():
    w = UserWork("u", _items(4), [State(3, "t", "h")])
    assert UserWork.from_json(w.to_json()) == w


# --------------------------------------------------------------------------- slow (real vLLM)


def slow_cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    return config_from_dict(
        {
            "run_dir": str(run_dir),
            "cache_dir": CACHE,
            "user_preferences": {
                # float32: greedy outputs that do not depend on batching (bf16 may flip ties)
                "engine": {
                    "model": "tiny:qwen2",
                    "family": "qwen2",
                    "dtype": "float32",
                    "max_num_seqs": 64,
                },
                "sampling": {"max_new_tokens": 16, "temperature": 0.0},
                "pool": {"concurrency": 1, "batch_size": 16},
                "block_size": 3,
            },
        },
        list(overrides),
    )


def read_prefs(run: RunDir) -> list[tuple]:
    t = run.read_table("preferences")
    return sorted(
        zip(*(t.column(c).to_pylist() for c in ("user_id", "consumed", "text", "is_final")))
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ray_local):
    """The stage run once with the real engine on 36 users (1-3 blocks each, 3 batches)."""
    root = tmp_path_factory.mktemp("full")
    cfg = slow_cfg(root)
    run = write_run(root, make_tables(36))
    summary = stage.run_user_preferences(cfg, run)
    return cfg, run, summary, read_prefs(run)


@pytest.mark.slow
def test_stage_output_is_complete_and_deterministic(full_run, tmp_path):
    cfg, run, summary, prefs = full_run
    seqs = run.read_table("sequences").to_pylist()
    assert summary["rows_in"] == 36 == summary["rows_out"] and summary["quarantined"] == 0
    # continuous feeding: engine_calls counts engine steps, at least one per block of a chain
    assert summary["batches"] == 3 and summary["engine_calls"] >= 9
    assert 0 < summary["wavefront_seconds"] <= summary["seconds"]  # engine time, start excluded
    # the engine phase's wall span covers the wavefronts of one actor, batch after batch
    assert summary["wavefront_seconds"] * 0.99 <= summary["active_seconds"] <= summary["seconds"]
    assert summary["blocks"] == sum(len(stage.block_bounds(len(s["history"]), 3)) for s in seqs)
    assert summary["states"] == len(prefs) == summary["blocks"]
    by_user: dict[str, list] = {}
    for user_id, consumed, text, is_final in prefs:
        by_user.setdefault(user_id, []).append((consumed, is_final, text))
    for s in seqs:
        chain = by_user[s["user_id"]]
        ends = [e for _, e in stage.block_bounds(len(s["history"]), 3)]
        assert [c for c, _, _ in chain] == ends
        assert [f for _, f, _ in chain] == [False] * (len(ends) - 1) + [True]
        assert all(text for _, _, text in chain)
    # A fresh run on another run directory gives the very same states.
    other = write_run(tmp_path / "again", make_tables(36))
    again = stage.run_user_preferences(slow_cfg(tmp_path / "again"), other)
    assert again["engine_calls"] >= 9
    assert read_prefs(other) == prefs


@pytest.mark.slow
def test_rerun_skips_finished_users(full_run, tmp_path):
    cfg, run, summary, prefs = full_run
    rerun = stage.run_user_preferences(cfg, run)
    assert rerun["engine_calls"] == 0 and rerun["batches_skipped"] == 3
    assert rerun["users_skipped"] == 36 and read_prefs(run) == prefs
    # Lose one batch (a crash before its part was written): only that batch is recomputed.
    copy = write_run(tmp_path / "copy", make_tables(36))
    for f in run.table_files("preferences"):
        name = f.rsplit("/", 1)[-1][: -len(".parquet")]
        copy.write_table("preferences", pq.read_table(f), name=name)
    lost = copy.table_files("preferences")[1]
    copy.fs.delete_file(lost)
    resumed = stage.run_user_preferences(slow_cfg(tmp_path / "copy"), copy)
    assert resumed["batches_skipped"] == 2 and resumed["users_computed"] in (4, 16)
    assert 0 < resumed["engine_calls"]
    assert read_prefs(copy) == prefs


@pytest.mark.slow
def test_incremental_refresh_equals_full_recomputation(full_run, tmp_path):
    cfg, _, full_summary, prefs = full_run
    # The same users before their last 2 interactions (plus 4 users not seen yet).
    tables = make_tables(36)
    older = tables["sequences"].to_pylist()
    for row in older:
        row["history"] = row["history"][:-2] if len(row["history"]) > 2 else row["history"]
    older = [r for i, r in enumerate(older) if i % 9 != 0]
    run = write_run(
        tmp_path / "refresh",
        {**tables, "sequences": pa.Table.from_pylist(older, schema=schema.SEQUENCES)},
    )
    rcfg = slow_cfg(tmp_path / "refresh")
    stage.run_user_preferences(rcfg, run)
    # New interactions arrive: the full histories. Only the new blocks are summarized.
    run.remove("sequences")
    run.write_table("sequences", tables["sequences"])
    refreshed = stage.run_user_preferences(rcfg, run)
    assert refreshed["users_reusing_states"] > 0 and refreshed["stale_parts_removed"] > 0
    assert refreshed["blocks"] < full_summary["blocks"]
    assert refreshed["blocks"] + refreshed["reused_states"] == full_summary["blocks"]
    assert read_prefs(run) == prefs


class EchoEngine:
    """A scripted stand-in for :class:`~mllm_msr.engines.vllm.VLLMEngine` (same ``generate``
    signature): each answer lists the ``SUMMARY-<item>`` markers its prompt holds, so anything a
    prompt leaks is carried on by the recurrence into the user's next prompts and final state."""

    def __init__(self) -> None:
        self.calls: list[list[prompts.Chat]] = []

    def generate(self, chats, sampling, lora_path=None, seeds=None, on_error="raise"):
        from mllm_msr.engines.vllm import Generation

        assert on_error == "skip" and seeds is None  # greedy decoding, failures per request
        self.calls.append(list(chats))
        out = []
        for chat in chats:
            markers = sorted(set(re.findall(r"SUMMARY-i\d{3}", chat[0]["content"])))
            out.append(Generation(" ".join(markers), 1, len(markers), "stop"))
        return out


def test_no_target_summary_reaches_the_prompts_of_its_user():
    """Leakage through the engine path (``engine_generate`` + the recurrence), scripted engine:
    neither the prompts of a user nor the states carried between their blocks see the target."""
    up = slow_cfg(Path("unused")).user_preferences
    tables = make_tables(30, hist_len=lambda u: 2 + u % 8)
    summaries = dict(
        zip(*(tables["item_summaries"].column(c).to_pylist() for c in ("item_id", "summary")))
    )
    titles = dict(zip(*(tables["items"].column(c).to_pylist() for c in ("item_id", "title"))))
    plan = stage.plan_users(tables["sequences"], titles, summaries, {}, up)
    works = [w for _, ws in plan.batches for w in ws]
    trace: dict[str, list] = {}
    engine = EchoEngine()
    chains, stats = stage.wavefront(works, stage.engine_generate(engine, up), up, trace)
    assert stats.engine_calls == 3 == len(engine.calls) and stats.users == 30
    assert stats.empty_outputs == 0 and stats.engine_errors == 0
    # Continuous feeding (one request at a time in flight) sends the very same prompts.
    feeder_trace: dict[str, list] = {}
    one = up_config(**{**up.__dict__, "max_in_flight": 1})
    feeder = stage.generate_feeder(stage.engine_generate(EchoEngine(), one))
    fed, _ = stage.continuous_wavefront(works, feeder, one, feeder_trace)
    assert feeder_trace == trace and fed == chains
    for row in tables["sequences"].to_pylist():
        user_prompts = " ".join(chat[0]["content"] for chat in trace[row["user_id"]])
        assert f"SUMMARY-{row['target']} " not in user_prompts
        assert all(f"SUMMARY-{i} " in user_prompts for i in row["history"])
        final = chains[row["user_id"]][-1]
        assert final.consumed == len(row["history"])
        # The final state echoes exactly what the user's prompts showed: the whole history.
        assert set(final.text.split()) == {f"SUMMARY-{i}" for i in row["history"]}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_continuous_feeding_equals_the_rounds_on_the_real_engine():
    """Greedy decoding in float32 on the tiny model: the continuous path (vLLM's engine fed
    request by request) gives the rounds' texts and states; a request the engine refuses (a
    prompt over max_model_len) gets the fallback text on both paths."""
    from mllm_msr.engines.vllm import VLLMEngine

    up = slow_cfg(Path("unused")).user_preferences
    up.engine.max_model_len = 512
    up.max_in_flight = 5
    works = [
        UserWork(
            f"u{u}", [HistoryItem(f"i{u}-{j}", f"Title {u} {j}", f"a cover {j}") for j in range(n)]
        )
        for u, n in enumerate([7, 3, 9, 1, 5, 8, 4, 6])
    ]
    # a first block over max_model_len (3 x 1200 characters): refused by the engine
    huge = [HistoryItem(f"huge{k}", f"Huge {k}", f"w{k} " * 600) for k in range(3)]
    works.append(UserWork("u-bad", huge + _items(2)))
    with VLLMEngine(up.engine, cache_dir=CACHE) as engine:
        ref_trace: dict[str, list] = {}
        ref, ref_stats = stage.wavefront(works, stage.engine_generate(engine, up), up, ref_trace)
        trace: dict[str, list] = {}
        fed, stats = stage.continuous_wavefront(works, stage.engine_feeder(engine, up), up, trace)
        assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert trace == ref_trace and fed == ref
    assert stats.blocks == ref_stats.blocks == 19 and stats.engine_calls > ref_stats.engine_calls
    assert stats.engine_errors == ref_stats.engine_errors == 1
    assert fed["u-bad"][0].text == stage.fallback_text(huge)
    assert all(s.text for chain in fed.values() for s in chain)
