"""The protocol: k-core, sequences, split, negatives; determinism across runs and blocks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mllm_msr.config import PrepareConfig, config_from_dict
from mllm_msr.data import demo
from mllm_msr.data.prepare import (
    assign_splits,
    build_examples,
    candidates_of,
    kcore,
    user_sequences,
    with_splits,
)


def interactions(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "user_id": [u for u, _ in pairs],
            "item_id": [i for _, i in pairs],
            "timestamp": pa.array(range(len(pairs)), pa.int64()),
        }
    )


def test_kcore_hand_computed_case():
    # (user_core, item_core) = (2, 2), by hand:
    # round 1: u4 (1 item) and e (1 user) go -> rows u4-d, u3-e dropped
    # round 2: d has only u3 left -> u3-d dropped
    # round 3: u3 has only c left -> u3-c dropped
    # round 4: c has only u1 left -> u1-c dropped; then u1 {a, b}, u2 {a, b} is a fixed point.
    pairs = [
        ("u1", "a"),
        ("u1", "b"),
        ("u1", "c"),
        ("u2", "a"),
        ("u2", "b"),
        ("u3", "c"),
        ("u3", "d"),
        ("u3", "e"),
        ("u4", "d"),
    ]
    t = interactions(pairs)
    kc = kcore(t["user_id"], t["item_id"], 2, 2)
    kept = [p for p, m in zip(pairs, kc.mask) if m]
    assert kept == [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]
    assert (kc.users_before, kc.items_before, kc.users_after, kc.items_after) == (4, 5, 2, 2)
    assert kc.rounds >= 3
    # a (1, 1)-core keeps everything; an impossible core keeps nothing
    assert kcore(t["user_id"], t["item_id"], 1, 1).mask.all()
    assert not kcore(t["user_id"], t["item_id"], 4, 4).mask.any()


def _demo_users(n_users=200, n_items=60, cfg=None):
    cfg = cfg or PrepareConfig(user_core=6, item_core=5, max_history=5)
    inter = demo.interactions_table(range(n_users), seed=1, n_items=n_items)
    kc = kcore(inter["user_id"], inter["item_id"], cfg.user_core, cfg.item_core)
    core = inter.filter(pa.array(kc.mask))
    seqs = with_splits(user_sequences(core), cfg)
    pool = np.array(sorted(set(core["item_id"].to_pylist())), dtype=str)
    return seqs, pool, cfg


def test_sequences_history_target_and_negatives():
    seqs, pool, cfg = _demo_users()
    ex = build_examples(seqs, pool, cfg)
    assert ex.num_rows == seqs.num_rows
    by_user = dict(zip(seqs["user_id"].to_pylist(), seqs["items"].to_pylist()))
    for row in ex.to_pylist():
        items = by_user[row["user_id"]]
        assert row["target"] == items[-1]
        assert row["history"] == items[:-1][-cfg.max_history :]
        negatives = row["candidates"][1:]
        k = cfg.train_negatives if row["split"] == "train" else cfg.eval_negatives
        assert len(negatives) == len(set(negatives)) == k
        assert row["candidates"][0] == row["target"] and row["labels"] == [1] + [0] * k
        assert not set(negatives) & set(items)  # never the history, the target or later items
        assert set(negatives) <= set(pool.tolist())
    cands = candidates_of(ex)
    assert cands.num_rows == sum(len(c) for c in ex["candidates"].to_pylist())


def test_split_is_seeded_and_proportional():
    ids = [f"u{i}" for i in range(1000)]
    a = assign_splits(ids, [0.8, 0.1, 0.1], seed=42)
    assert a == assign_splits(list(reversed(ids)), [0.8, 0.1, 0.1], seed=42)
    assert a != assign_splits(ids, [0.8, 0.1, 0.1], seed=43)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 800, "val": 100, "test": 100}


def test_examples_identical_across_runs_and_block_counts():
    seqs, pool, cfg = _demo_users()
    whole = build_examples(seqs, pool, cfg)
    assert whole.equals(build_examples(seqs, pool, cfg))
    for n_blocks in (2, 7):
        bounds = np.linspace(0, seqs.num_rows, n_blocks + 1).astype(int)
        parts = [
            build_examples(seqs.slice(a, b - a), pool, cfg) for a, b in zip(bounds[:-1], bounds[1:])
        ]
        assert pa.concat_tables(parts).equals(whole)
    shuffled = seqs.take(pa.array(np.random.default_rng(0).permutation(seqs.num_rows)))
    again = build_examples(shuffled, pool, cfg).sort_by([("user_id", "ascending")])
    assert again.equals(whole.sort_by([("user_id", "ascending")]))
    other_seed = build_examples(seqs, pool, PrepareConfig(seed=7, max_history=5))
    assert not other_seed["candidates"].equals(whole["candidates"])


def test_leave_one_out():
    cfg = PrepareConfig(split="leave_one_out", max_history=3)
    seqs, pool, _ = _demo_users(cfg=cfg)
    ex = build_examples(seqs, pool, cfg)
    assert ex.num_rows == 3 * seqs.num_rows
    items = dict(zip(seqs["user_id"].to_pylist(), seqs["items"].to_pylist()))
    for row in ex.to_pylist():
        seq = items[row["user_id"]]
        back = {"test": 1, "val": 2, "train": 3}[row["split"]]
        assert row["target"] == seq[-back]
        assert row["history"] == seq[: len(seq) - back][-3:]


@pytest.mark.slow
def test_prepare_stage_same_outputs_for_any_block_count(ray_local, tmp_path):
    from mllm_msr.runtime import RunDir
    from mllm_msr.stages.ingest import run_ingest
    from mllm_msr.stages.prepare import run_prepare

    tables = {}
    for n_blocks in (1, 3):
        cfg = config_from_dict(
            {
                "run_dir": str(tmp_path / f"run{n_blocks}"),
                "ingest": {
                    "format": "demo",
                    "demo_users": 120,
                    "demo_items": 48,
                    "num_shards": n_blocks,
                },
                "prepare": {"num_blocks": n_blocks, "max_history": 4},
            }
        )
        run = RunDir(cfg.run_dir)
        run_ingest(cfg, run)
        s = run_prepare(cfg, run)
        assert (
            s["rows_in"] == s["rows_out"] + s["quarantined"] + s["kcore"]["interactions_filtered"]
        )
        assert s["users"] == sum(v["users"] for v in s["splits"].values())
        key = [("user_id", "ascending"), ("split", "ascending")]
        tables[n_blocks] = (
            run.read_table("sequences").sort_by(key),
            run.read_table("candidates").sort_by([*key, ("item_id", "ascending")]),
        )
    assert tables[1][0].equals(tables[3][0])
    assert tables[1][1].equals(tables[3][1])
    assert tables[1][1].num_rows > 0


def test_history_is_every_item_before_the_target_by_default():
    """The paper's protocol: no cap (``max_history: null``); a cap keeps the most recent."""
    seqs, pool, _ = _demo_users()
    full = build_examples(seqs, pool, PrepareConfig())
    capped = build_examples(seqs, pool, PrepareConfig(max_history=2))
    assert max(len(h) for h in full["history"].to_pylist()) > 9  # long histories exist
    items = dict(zip(seqs["user_id"].to_pylist(), seqs["items"].to_pylist()))
    for a, b in zip(full.to_pylist(), capped.to_pylist()):
        mine = items[a["user_id"]]
        pos = mine.index(a["target"])
        assert a["history"] == mine[:pos] and b["history"] == mine[:pos][-2:]
