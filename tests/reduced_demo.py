"""The reduced CPU demo that the end-to-end tests run (every stage, in minutes) and the checks
of its outputs they share (tests/test_pipeline.py, test_s3_run_dir.py, test_console.py,
test_local_cluster.py)."""

from __future__ import annotations

REDUCED_DEMO = [
    "ingest.demo_users=80",
    "ingest.demo_items=60",
    "item_summaries.sampling.max_new_tokens=8",
    "user_preferences.sampling.max_new_tokens=8",
    "train.max_steps=4",
    "train.checkpoint_every=4",
    "train.image_size=56",
]


def check_counts_add_up(run):
    """Nothing lost between stages: each item summarized or quarantined, once; each user with
    one final preference. Returns the ``sequences`` table (user_id, split)."""
    items = run.read_table("items", ["item_id"])
    summaries = run.read_table("item_summaries", ["item_id"])
    quarantined = (
        run.read_table("quarantine/item_summaries", ["key"])["key"].to_pylist()
        if run.table_files("quarantine/item_summaries")
        else []
    )
    done = summaries["item_id"].to_pylist()
    assert len(done) == len(set(done)) and not set(done) & set(quarantined)
    assert sorted(done + quarantined) == sorted(items["item_id"].to_pylist())
    sequences = run.read_table("sequences", ["user_id", "split"])
    prefs = run.read_table("preferences", ["user_id", "is_final"])
    finals = [u for u, f in zip(prefs["user_id"].to_pylist(), prefs["is_final"].to_pylist()) if f]
    assert sorted(finals) == sorted(sequences["user_id"].to_pylist())
    return sequences
