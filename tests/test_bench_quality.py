"""bench/quality_microlens.py: its modes and its paired comparisons change one setting each."""

from __future__ import annotations

from pathlib import Path

import file_module

from mllm_msr.config import load_config, to_dict
from mllm_msr.contract import flatten

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    return file_module.load("quality", ROOT / "bench" / "quality_microlens.py")


def test_full_mode_scores_every_test_user_and_quick_mode_the_sample():
    bench = _bench()
    full = load_config(bench.CONFIG, bench.mode_overrides(quick=False, train_users=None))
    quick = load_config(bench.CONFIG, bench.mode_overrides(quick=True, train_users=None))
    assert "test" not in full.prepare.max_users  # all 2,541 MicroLens-50k test users
    assert full.prepare.max_users["train"] >= 4000
    assert quick.prepare.max_users == {"train": 500, "val": 32, "test": 150}
    more = load_config(bench.CONFIG, bench.mode_overrides(quick=True, train_users=900))
    assert more.prepare.max_users["train"] == 900


def test_each_variant_differs_from_the_main_run_in_its_one_setting():
    bench = _bench()
    overrides = bench.mode_overrides(quick=True, train_users=None)
    base = load_config(bench.CONFIG, overrides)
    configs = bench.variant_configs(
        base, overrides, direct=True, history_prompt=True, truncated=True, lrs=(1e-3,)
    )
    main = flatten(to_dict(base))
    changed = {}
    for suffix, cfg in configs.items():
        flat = flatten(to_dict(cfg))
        keys = set(main) | set(flat)
        diff = {k for k in keys if flat.get(k) != main.get(k)}
        diff = {"prepare.max_users" if k.startswith("prepare.max_users.") else k for k in diff}
        changed[suffix] = sorted(diff - {"run_dir", "evaluate.baselines", "stages"})
    assert changed == {
        "": [],
        "-alltrain": ["prepare.max_users"],
        "-direct": ["user_preferences.mode"],
        "-history": ["train.prompt"],
        "-truncated": ["prepare.max_history"],
        "-lr0.001": ["train.learning_rate"],
    }
    labels = [label for _, _, label in bench.rows_for(configs)]
    assert "SmolLM2 LoRA, lr 0.001" in labels and bench.FINE_TUNED in labels
