"""The demo catalog: deterministic, chunkable, images carry the category, taste drifts."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
from PIL import Image

from mllm_msr.data import demo


def test_items_are_deterministic_and_images_show_their_category():
    a = demo.items_table(range(16), seed=0)
    assert a.equals(demo.items_table(range(16), seed=0))
    assert not a.equals(demo.items_table(range(16), seed=1))
    for i, row in enumerate(a.to_pylist()):
        cat = demo.CATEGORIES[demo.item_category(i)]
        assert cat.name in row["text"] and demo._NOUNS[cat.name] in row["title"]
        pixels = np.asarray(Image.open(io.BytesIO(row["image_png"])).convert("RGB"), float)
        share = {
            c.name: float((np.linalg.norm(pixels - np.array(c.colour), axis=-1) < 50).mean())
            for c in demo.CATEGORIES
        }
        assert share[cat.name] > 0.05, (i, share)
        assert share[cat.name] == max(share.values()), (i, share)


def test_users_are_chunkable_and_have_no_repeats():
    whole = demo.interactions_table(range(60), seed=3, n_items=120)
    parts = [demo.interactions_table(range(a, a + 20), seed=3, n_items=120) for a in (0, 20, 40)]
    assert whole.equals(pa.concat_tables(parts))
    for u in range(60):
        items, times = demo.user_sequence(u, seed=3, n_items=120)
        assert len(items) == len(set(items)) >= 6
        assert times == sorted(times)


def test_taste_drifts_so_recent_history_beats_popularity():
    n_items, users = 120, range(400)
    seqs = [demo.user_sequence(u, seed=0, n_items=n_items)[0] for u in users]
    cat = demo.item_category
    popular_cat = Counter(cat(i) for s in seqs for i in s[:-1]).most_common(1)[0][0]
    recent = np.mean([cat(s[-1]) == cat(s[-2]) for s in seqs])
    early = np.mean([cat(s[-1]) == cat(s[0]) for s in seqs])
    popular = np.mean([cat(s[-1]) == popular_cat for s in seqs])
    assert recent > 0.6 > 0.3 > max(early, popular), (recent, early, popular)
