"""``prepare.max_users``: a seeded per-split user sample that leaves the protocol unchanged."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mllm_msr.config import ConfigError, load_config
from mllm_msr.data.prepare import sample_split_users


def _seqs(n: int = 200) -> pa.Table:
    splits = ["train"] * (n * 8 // 10) + ["val"] * (n // 10) + ["test"] * (n // 10)
    return pa.table({"user_id": [f"u{i:04d}" for i in range(n)], "split": splits})


def _kept(table: pa.Table, split: str) -> set[str]:
    return {
        u for u, s in zip(table["user_id"].to_pylist(), table["split"].to_pylist()) if s == split
    }


def test_sample_is_seeded_bounded_and_independent_of_other_splits():
    seqs = _seqs()
    a = sample_split_users(seqs, {"train": 30, "test": 5}, seed=1)
    b = sample_split_users(seqs, {"train": 30, "test": 5}, seed=1)
    assert a.equals(b)
    assert len(_kept(a, "train")) == 30 and len(_kept(a, "test")) == 5
    assert _kept(a, "val") == _kept(seqs, "val")  # no bound: every user
    # the test sample does not depend on the train bound (a full-train run scores the same users)
    c = sample_split_users(seqs, {"test": 5}, seed=1)
    assert _kept(c, "test") == _kept(a, "test") and _kept(c, "train") == _kept(seqs, "train")
    assert _kept(sample_split_users(seqs, {"test": 5}, seed=2), "test") != _kept(a, "test")
    # row order is kept; a bound above the split's size keeps everyone
    ids = a["user_id"].to_pylist()
    assert ids == sorted(ids)
    assert sample_split_users(seqs, {"val": 10_000}, seed=1).equals(seqs)
    assert sample_split_users(seqs, {}, seed=1).equals(seqs)


def test_max_users_config_is_checked():
    with pytest.raises(ConfigError, match="unknown split"):
        load_config(None, ["prepare.max_users={tran: 3}"])
    with pytest.raises(ConfigError, match="split: user"):
        load_config(None, ["prepare.split=leave_one_out", "prepare.max_users={test: 3}"])
    assert load_config(None, ["prepare.max_users={test: 3}"]).prepare.max_users == {"test": 3}
