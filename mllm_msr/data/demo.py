"""Deterministic demo catalog: drawn item images, titles and users whose taste drifts.

Each item belongs to one of :data:`CATEGORIES`; its image shows the category's shape, colour and
pattern (with per-item jitter of position, size and background), its title names the category's
theme and its text describes the picture. Each user starts in one category and drifts to another
over time: early items come mostly from the first, late items (and so the target, the last item)
mostly from the second, with a little noise. A model that reads the recent history therefore beats
popularity, which only knows the (balanced) global item counts.

Everything is a pure function of ``(seed, index)``: items and users can be generated in any order,
in any chunks, on any worker (:func:`items_table`, :func:`interactions_table`), which is how the
ingest stage streams 100k users without building them in memory.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Category:
    """A visual theme: what an item of this category looks like."""

    name: str
    shape: str
    colour: tuple[int, int, int]
    colour_name: str
    pattern: str


CATEGORIES: tuple[Category, ...] = (
    Category("ocean", "circle", (30, 90, 210), "blue", "waves"),
    Category("forest", "triangle", (30, 140, 60), "green", "stripes"),
    Category("sunset", "square", (240, 120, 30), "orange", "dots"),
    Category("candy", "star", (225, 60, 160), "pink", "checks"),
    Category("night", "diamond", (70, 40, 140), "purple", "grid"),
    Category("desert", "hexagon", (200, 170, 60), "sand-yellow", "diagonal"),
    Category("volcano", "cross", (200, 30, 30), "red", "rings"),
    Category("snow", "ring", (120, 200, 220), "ice-blue", "plain"),
)

_ADJECTIVES = (
    "Quiet",
    "Bright",
    "Wild",
    "Tiny",
    "Golden",
    "Hidden",
    "Lucky",
    "Electric",
    "Gentle",
    "Brave",
    "Secret",
    "Happy",
)
_NOUNS = {
    "ocean": "Tides",
    "forest": "Pines",
    "sunset": "Dusk",
    "candy": "Sweets",
    "night": "Stars",
    "desert": "Dunes",
    "volcano": "Lava",
    "snow": "Frost",
}
IMAGE_SIDE = 96
BASE_TIME = 1_600_000_000


def item_id(i: int) -> str:
    return f"i{i:06d}"


def user_id(u: int) -> str:
    return f"u{u:07d}"


def item_category(i: int, n_categories: int = len(CATEGORIES)) -> int:
    return i % n_categories


# --------------------------------------------------------------------------- items


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = [90, 210, 330], [r] * 3
    elif shape == "square":
        angles, radii = [45, 135, 225, 315], [r] * 4
    elif shape == "diamond":
        angles, radii = [0, 90, 180, 270], [r * 0.8, r, r * 0.8, r]
    elif shape == "hexagon":
        angles, radii = list(range(0, 360, 60)), [r] * 6
    elif shape == "star":
        angles = list(range(90, 450, 36))
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    else:
        raise ValueError(shape)
    return [
        (cx + rad * math.cos(math.radians(a)), cy - rad * math.sin(math.radians(a)))
        for a, rad in zip(angles, radii)
    ]


def _pattern(
    draw: ImageDraw.ImageDraw, pattern: str, colour: tuple[int, int, int], side: int, phase: int
) -> None:
    tint = tuple(int(c * 0.35 + 255 * 0.65) for c in colour)
    if pattern == "stripes":
        for x in range(phase % 12, side, 12):
            draw.rectangle([x, 0, x + 4, side], fill=tint)
    elif pattern == "dots":
        for y in range(phase % 14, side, 14):
            for x in range(phase % 14, side, 14):
                draw.ellipse([x, y, x + 4, y + 4], fill=tint)
    elif pattern == "checks":
        for y in range(0, side, 16):
            for x in range(0, side, 16):
                if (x + y) // 16 % 2 == 0:
                    draw.rectangle([x, y, x + 15, y + 15], fill=tint)
    elif pattern == "grid":
        for v in range(phase % 10, side, 10):
            draw.line([v, 0, v, side], fill=tint)
            draw.line([0, v, side, v], fill=tint)
    elif pattern == "diagonal":
        for v in range(-side + phase % 12, side, 12):
            draw.line([v, 0, v + side, side], fill=tint, width=3)
    elif pattern == "waves":
        for y0 in range(phase % 12, side, 12):
            pts = [(x, y0 + 3 * math.sin(x / 6.0)) for x in range(0, side + 1, 3)]
            draw.line(pts, fill=tint, width=2)
    elif pattern == "rings":
        c = side // 2
        for rad in range(6 + phase % 8, side, 12):
            draw.ellipse([c - rad, c - rad, c + rad, c + rad], outline=tint, width=2)


def draw_item_image(i: int, seed: int, side: int = IMAGE_SIDE) -> bytes:
    """PNG bytes of item ``i``: its category's pattern, shape and colour, with per-item jitter."""
    cat = CATEGORIES[item_category(i)]
    rng = np.random.default_rng([seed, 1, i])
    bg = tuple(int(v) for v in rng.integers(235, 256, size=3))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    _pattern(draw, cat.pattern, cat.colour, side, int(rng.integers(0, 100)))
    cx, cy = (side / 2 + rng.uniform(-side / 10, side / 10) for _ in range(2))
    r = side * rng.uniform(0.22, 0.32)
    shade = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in cat.colour)
    if cat.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
    elif cat.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=shade, width=max(3, int(r / 3)))
    elif cat.shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=shade)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=shade)
    else:
        draw.polygon(_polygon(cat.shape, cx, cy, r), fill=shade)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def item_title(i: int, seed: int) -> str:
    cat = CATEGORIES[item_category(i)]
    adj = _ADJECTIVES[int(np.random.default_rng([seed, 2, i]).integers(len(_ADJECTIVES)))]
    return f"{adj} {_NOUNS[cat.name]} #{i}"


def item_text(i: int) -> str:
    cat = CATEGORIES[item_category(i)]
    return (
        f"A {cat.colour_name} {cat.shape} on a light background with a {cat.pattern} pattern; "
        f"from the {cat.name} collection."
    )


DEMO_ITEMS_RAW = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("image_png", pa.binary()),
    ]
)


def items_table(indices: np.ndarray | list[int], seed: int) -> pa.Table:
    """Raw demo items (``DEMO_ITEMS_RAW``): ids, titles, texts and drawn PNG images."""
    idx = [int(i) for i in indices]
    return pa.table(
        {
            "item_id": [item_id(i) for i in idx],
            "title": [item_title(i, seed) for i in idx],
            "text": [item_text(i) for i in idx],
            "image_png": [draw_item_image(i, seed) for i in idx],
        },
        schema=DEMO_ITEMS_RAW,
    )


# --------------------------------------------------------------------------- users


@functools.lru_cache(maxsize=8)
def _pools(n_items: int, n_cat: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per category: item indices and Zipf-like weights; last entry: all items, uniform."""
    out = []
    for c in range(n_cat):
        pool = np.arange(c, n_items, n_cat)
        out.append((pool, 1.0 / (np.arange(len(pool)) + 1.0)))
    out.append((np.arange(n_items), np.ones(n_items)))
    return out


def user_sequence(
    u: int, seed: int, n_items: int, min_len: int = 6, max_len: int = 16, noise: float = 0.1
) -> tuple[list[int], list[int]]:
    """Chronological item indices and timestamps of user ``u`` (no repeated items).

    The user drifts from a start category to an end category: item ``t`` of ``L`` comes from
    the end category with probability ``sigmoid(10 (t / (L - 1) - 0.5))``, and from a uniformly
    random item with probability ``noise``. Within a category, items are drawn with Zipf-like
    popularity (weight ``1 / (rank + 1)``).
    """
    n_cat = min(len(CATEGORIES), n_items)
    rng = np.random.default_rng([seed, 3, u])
    length = int(min(rng.integers(min_len, max_len + 1), n_items))
    start = int(rng.integers(n_cat))
    end = (start + 1 + int(rng.integers(n_cat - 1))) % n_cat if n_cat > 1 else start
    t0 = BASE_TIME + int(rng.integers(0, 365 * 86400))
    pools = _pools(n_items, n_cat)
    items: list[int] = []
    for t in range(length):
        p_end = 1.0 / (1.0 + math.exp(-10.0 * (t / max(length - 1, 1) - 0.5)))
        if rng.random() < noise:
            pool, weights = pools[-1]
        else:
            pool, weights = pools[end if rng.random() < p_end else start]
        w = np.where(np.isin(pool, items), 0.0, weights)
        if not w.any():  # category exhausted: any unseen item
            pool, weights = pools[-1]
            w = np.where(np.isin(pool, items), 0.0, weights)
        items.append(int(pool[rng.choice(len(pool), p=w / w.sum())]))
    times = [t0 + 3600 * t + int(rng.integers(0, 600)) for t in range(length)]
    return items, times


def interactions_table(users: np.ndarray | list[int], seed: int, n_items: int) -> pa.Table:
    """Demo interactions (the INTERACTIONS schema) of the given user indices."""
    uids: list[str] = []
    iids: list[str] = []
    ts: list[int] = []
    for u in users:
        items, times = user_sequence(int(u), seed, n_items)
        uids.extend([user_id(int(u))] * len(items))
        iids.extend(item_id(i) for i in items)
        ts.extend(times)
    return pa.table(
        {
            "user_id": pa.array(uids, pa.string()),
            "item_id": pa.array(iids, pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
        }
    )
