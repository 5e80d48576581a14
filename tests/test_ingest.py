"""Ingest adapters on small fixture files with every kind of bad row.

Fast tests call the adapters' pure functions (parsing, dedupe, image loading) on pyarrow tables;
the ``slow`` tests run the whole Ray Data stage and check that every bad row lands in quarantine
with its reason and that read = written + quarantined.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mllm_msr.config import ConfigError, IngestConfig, config_from_dict
from mllm_msr.data.ingest.amazon import parse_meta, parse_reviews
from mllm_msr.data.ingest.common import (
    RAW_ITEM_ROWS,
    ImageLoader,
    dedupe_interactions,
    dedupe_items,
    item_row,
    parse_timestamp,
    rows_table,
)
from mllm_msr.data.ingest.microlens import parse_pairs_lines
from mllm_msr.data.ingest.readers import DETAIL, ERROR, LINE, csv_records
from mllm_msr.runtime import RunDir
from mllm_msr.stages.ingest import run_ingest


def png(size=(32, 32), mode="RGB", colour=(10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(out, format="PNG")
    return out.getvalue()


def noisy_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


BOMB = png((4000, 4000), mode="L")  # ~16 KB on disk, 16 Mpx decoded
IMAGES = {"max_side": 64, "max_pixels": 1_000_000, "max_bytes": 100_000}


def reasons(table: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in table["reason"].to_pylist():
        out[r] = out.get(r, 0) + 1
    return out


def check_counts(summary: dict) -> None:
    for kind in ("items", "images", "interactions"):
        c = summary[kind]
        assert c["read"] == c["written"] + c["quarantined"], (kind, c)
        assert c["quarantined"] == sum(c["quarantined_by_reason"].values())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def microlens_root(tmp_path):
    root = tmp_path / "ml"
    covers = root / "covers"
    covers.mkdir(parents=True)
    (root / "pairs.tsv").write_text(
        "u1\ti1 i2 i3 i2\n"  # i2 twice -> duplicate_interaction
        "u2\ti1 i4\n"
        "u3\n"  # no items -> malformed_line
        "u4\ti1 ghost\n"  # ghost is not an item (the prepare stage quarantines it)
    )
    (root / "titles.csv").write_text(
        "item,title\n"
        "i1,Red circle\n"
        'i2,"Blue square, large"\n'
        "i3,Green star\n"
        "i4,\n"  # empty_text
        "i1,Red circle with a longer title\n"  # duplicate_item (the longer one is kept)
        "../outside,Escape attempt\n"  # cover path escapes covers/ -> path_escape
        "i5,Bomb\n"
        "i6,Corrupt\n"
        "i7,Too big\n"
    )
    (covers / "i1.png").write_bytes(png())
    (covers / "i2.jpg").write_bytes(png(colour=(200, 0, 0)))
    (covers / "i5.png").write_bytes(BOMB)
    (covers / "i6.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (covers / "i7.png").write_bytes(noisy_png(300))
    (root / "outside.png").write_bytes(png())
    return root


REDIRECTS = {"/to-ok.png": "/ok.png", "/to-metadata.png": "http://169.254.169.254/latest/"}


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # paths asked, in order (reset by the fixture)

    def do_GET(self):  # noqa: N802
        _Handler.requests.append(self.path)
        if self.path == "/slow.png":
            time.sleep(2.0)
        body = {"/ok.png": png(), "/slow.png": png(), "/corrupt.jpg": b"GIF89a garbage"}.get(
            self.path
        )
        try:
            if self.path in REDIRECTS:
                self.send_response(302)
                self.send_header("Location", REDIRECTS[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/drip.png":  # a valid answer, one byte every 0.5 s
                data = png()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(min(len(data), 40)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.5)
                return
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def amazon_root(tmp_path, image_server):
    root = tmp_path / "amazon"
    root.mkdir()
    url = image_server
    reviews = [
        {"user_id": "A", "parent_asin": "P1", "timestamp": 1_600_000_000_000, "rating": 5.0},
        {"user_id": "A", "parent_asin": "P2", "timestamp": 1_600_000_100_000},
        {"user_id": "A", "parent_asin": "P2", "timestamp": 1_600_000_200_000},  # duplicate
        {"user_id": "B", "parent_asin": "P1", "timestamp": "soon"},  # bad_timestamp
        {"user_id": "", "parent_asin": "P3", "timestamp": 1},  # missing_id
        {"user_id": "B", "asin": "P3", "timestamp": 1_600_000_300_000},  # asin fallback
    ]
    lines = [json.dumps(r) for r in reviews] + ["{not json"]
    (root / "Toys.jsonl").write_text("\n".join(lines) + "\n")
    meta = [
        {
            "parent_asin": "P1",
            "title": "Robot",
            "features": ["metal", "loud"],
            "images": [{"large": f"{url}/ok.png"}, {"large": f"{url}/missing.png"}],
        },
        {
            "parent_asin": "P2",
            "title": "Kite",
            "description": ["flies"],
            "images": [{"hi_res": f"{url}/slow.png"}],
        },
        {"parent_asin": "P3", "title": "Ball", "images": [{"thumb": f"{url}/corrupt.jpg"}]},
        {"parent_asin": "P4", "title": "", "features": []},  # empty_text
    ]
    lines = [json.dumps(m) for m in meta] + ["[1, 2, 3]"]  # valid JSON, not an object
    (root / "meta_Toys.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- fast: pure parts


def test_pairs_lines_parse_positions_and_malformed_lines():
    t = parse_pairs_lines(pa.table({"text": ["u1\ti1 i2", "u3", "\ti9"]}), "interactions:p")
    rows = t.to_pylist()
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows[:2]] == [
        ("u1", "i1", 0),
        ("u1", "i2", 1),
    ]
    assert [r["q_reason"] for r in rows] == [None, None, "malformed_line", "malformed_line"]


def test_dedupe_interactions_keeps_earliest_and_is_order_independent():
    rows = parse_pairs_lines(pa.table({"text": ["u1\ti1 i2 i1 i3 i2"]}), "x")
    a = dedupe_interactions(rows)
    b = dedupe_interactions(rows.take(pa.array([4, 3, 2, 1, 0])))
    assert a.sort_by("timestamp").equals(b.sort_by("timestamp"))
    good = a.filter(pa.compute.is_null(a["q_reason"]))
    assert good["item_id"].to_pylist() == ["i1", "i2", "i3"]
    assert good["timestamp"].to_pylist() == [0, 1, 3]
    assert a["q_reason"].to_pylist().count("duplicate_interaction") == 2


def test_dedupe_items_keeps_the_most_complete_row():
    cfg = IngestConfig()
    rows = [
        item_row("i1", "short", "", [], "items:t", cfg),
        item_row("i1", "a longer title", "", [], "items:t", cfg),
        item_row("i1", "x", "", ["i1.png"], "items:t", cfg),
        item_row("i2", "", "", [], "items:t", cfg),
    ]
    out = dedupe_items(rows_table(rows, RAW_ITEM_ROWS)).to_pylist()
    kept = [r for r in out if r["q_reason"] is None]
    assert [(r["item_id"], r["title"]) for r in kept] == [("i1", "x")]
    assert sorted(r["q_reason"] for r in out if r["q_reason"]) == [
        "duplicate_item",
        "duplicate_item",
        "empty_text",
    ]


def test_image_loader_urls_timeouts_404_and_corrupt(image_server, tmp_path):
    cfg = config_from_dict(
        {
            "ingest": {
                "http_timeout_s": 0.5,
                "http_retries": 1,
                "http_allow_hosts": ["127.0.0.1"],  # the test server is on loopback
                "max_images_per_item": 8,
                "images": IMAGES,
            }
        }
    ).ingest
    url = image_server
    refs = [
        f"{url}/ok.png",
        f"{url}/missing.png",
        f"{url}/slow.png",
        f"{url}/corrupt.jpg",
        "file:///etc/passwd",
    ]
    raw = rows_table([item_row("p", "t", "", refs, "items:m", cfg)], RAW_ITEM_ROWS)
    t0 = time.perf_counter()
    out = ImageLoader(cfg, None, "urls")(raw).to_pylist()
    assert time.perf_counter() - t0 < 2.0  # the slow image timed out (0.5 s, twice)
    item = [r for r in out if r["q_reason"] is None]
    assert len(item) == 1 and len(item[0]["images"]) == 1 and item[0]["image_hash"]
    assert sorted(r["q_reason"] for r in out if r["q_reason"]) == [
        "bad_url",
        "corrupt_image",
        "fetch_failed",
        "http_error",
    ]


def _image_loader(**ingest) -> ImageLoader:
    cfg = config_from_dict({"ingest": {"images": IMAGES, "max_images_per_item": 8, **ingest}})
    return ImageLoader(cfg.ingest, None, "urls")


def _load(loader: ImageLoader, refs: list[str]) -> tuple[list[dict], list[str]]:
    """(kept item rows, sorted quarantine reasons) of one item with image ``refs``."""
    raw = rows_table([item_row("p", "t", "", refs, "items:m", loader.cfg)], RAW_ITEM_ROWS)
    out = loader(raw).to_pylist()
    kept = [r for r in out if r["q_reason"] is None]
    return kept, sorted(r["q_reason"] for r in out if r["q_reason"])


def test_image_loader_cuts_a_drip_fed_fetch_at_the_deadline(image_server):
    loader = _image_loader(
        http_timeout_s=2.0,  # never trips: a byte arrives every 0.5 s
        http_deadline_s=1.0,
        http_retries=2,
        http_allow_hosts=["127.0.0.1"],
    )
    t0 = time.monotonic()
    kept, reasons = _load(loader, [f"{image_server}/drip.png", f"{image_server}/ok.png"])
    assert time.monotonic() - t0 < 1.0 + 0.75
    assert reasons == ["fetch_timeout"]
    assert len(kept) == 1 and len(kept[0]["images"]) == 1


def test_image_loader_refuses_loopback_and_redirects_to_blocked_addresses(image_server):
    kept, reasons = _load(_image_loader(), [f"{image_server}/ok.png"])  # no allowlist
    assert reasons == ["blocked_address"] and kept[0]["images"] == []
    assert _Handler.requests == []  # refused before any connection

    allowed = _image_loader(http_allow_hosts=["127.0.0.1"])
    t0 = time.monotonic()
    refs = [f"{image_server}/to-metadata.png", f"{image_server}/to-ok.png"]
    kept, reasons = _load(allowed, refs)
    assert reasons == ["blocked_address"] and len(kept[0]["images"]) == 1
    assert time.monotonic() - t0 < 1.0  # 169.254.169.254 was never contacted
    with pytest.raises(ConfigError):
        _image_loader(http_allow_hosts=["not a host name"])


def test_amazon_parsers(amazon_root):
    text = pa.table({"text": (amazon_root / "Toys.jsonl").read_text().splitlines()})
    rows = parse_reviews(text, "interactions:Toys.jsonl").to_pylist()
    assert rows[0]["timestamp"] == 1_600_000_000  # ms -> s
    assert [r["q_reason"] for r in rows][3:] == ["bad_timestamp", "missing_id", None, "bad_json"]
    meta = pa.table({"text": (amazon_root / "meta_Toys.jsonl").read_text().splitlines()})
    items = parse_meta(meta, "items:meta", IngestConfig()).to_pylist()
    assert items[0]["text"] == "metal loud" and len(items[0]["image_refs"]) == 2
    assert [r["q_reason"] for r in items] == [None, None, None, "empty_text", "bad_json"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"a,b\n1,2\n1,2,3\n4,5\n", [2, ("malformed_row", 3), 4]),  # extra field
        (b"a,b\n1\n4,5", [("malformed_row", 2), 3]),  # missing field, no final newline
        (b'a,b\n1,"2\n4,5\n6,7\n', [("malformed_row", 2), 3, 4]),  # quote never closed
        (b'a,b\n"1,2\n4,5\n', [("malformed_row", 2), 3]),  # ... with the right field count
        (b'a,b\n1,"x\r\ny"\r\n\r\n4,5\r\n', [2, 5]),  # a quoted newline, CRLF, a blank line
        (b"\xef\xbb\xbfa,b\n1,\xff\n4,5\n", [("not_utf8", 2), 3]),  # BOM, not UTF-8
        (b'a,b\n1,"' + b"x" * 200_000 + b"\n4,5\n", [("malformed_row", 2), 3]),  # field limit
    ],
)
def test_csv_records_keep_line_numbers_and_resume_after_a_bad_row(data, expected):
    records = list(csv_records(io.BytesIO(data)))
    assert records[0][1] == ["a", "b"]
    got = [line if error is None else (error, line) for line, _, error, _ in records[1:]]
    assert got == expected
    assert all(detail for _, fields, _, detail in records if fields is None)


def test_timestamps_out_of_range_are_rejected():
    assert [parse_timestamp(v) for v in ("12", " 1e3 ", 7, 2.9, str(2**63 - 1))] == [
        12,
        1000,
        7,
        2,
        2**63 - 1,
    ]
    for bad in ("1e30", 1e30, 2**63, "-5", -0.5, "nan", float("inf"), "soon", "", None, [1]):
        with pytest.raises((TypeError, ValueError)):
            parse_timestamp(bad)


def test_jsonl_lines_not_utf8_or_lone_surrogates_are_rejected_with_their_line():
    lines = pa.table(
        {
            "text": [None, '{"user_id": "\\ud800", "parent_asin": "p", "timestamp": 5}', "[1]"],
            LINE: [1, 2, 3],
            ERROR: ["not_utf8", None, None],
            DETAIL: ["bad byte", None, None],
        }
    )
    rows = parse_reviews(lines, "interactions:Toys.jsonl").to_pylist()
    assert [(r["q_reason"], r["q_key"]) for r in rows] == [
        ("not_utf8", "Toys.jsonl:1"),
        ("not_utf8", "Toys.jsonl:2"),
        ("bad_json", "Toys.jsonl:3"),
    ]


# --------------------------------------------------------------------------- slow: Ray stage


def _run(tmp_path, name, ingest: dict):
    cfg = config_from_dict({"run_dir": str(tmp_path / name), "ingest": ingest})
    run = RunDir(cfg.run_dir)
    return cfg, run, run_ingest(cfg, run)


@pytest.mark.slow
def test_microlens_stage_quarantines_every_bad_row_and_is_idempotent(
    ray_local, tmp_path, microlens_root
):
    ingest = {
        "format": "microlens",
        "root": str(microlens_root),
        "interactions": "pairs.tsv",
        "items": "titles.csv",
        "image_dir": "covers",
        "images": IMAGES,
        "num_shards": 2,
    }
    cfg, run, s = _run(tmp_path, "run", ingest)
    check_counts(s)
    assert (s["items"]["read"], s["items"]["written"]) == (9, 7)
    assert s["items"]["quarantined_by_reason"] == {"duplicate_item": 1, "empty_text": 1}
    assert (s["images"]["read"], s["images"]["written"]) == (6, 2)
    assert s["images"]["quarantined_by_reason"] == {
        "corrupt_image": 1,
        "decompression_bomb": 1,
        "oversized_image": 1,
        "path_escape": 1,
    }
    assert (s["interactions"]["read"], s["interactions"]["written"]) == (9, 7)
    assert s["interactions"]["quarantined_by_reason"] == {
        "duplicate_interaction": 1,
        "malformed_line": 1,
    }

    items = {r["item_id"]: r for r in run.read_table("items").to_pylist()}
    assert items["i1"]["title"] == "Red circle with a longer title"
    assert len(items["i1"]["images"]) == 1 and items["i5"]["images"] == []
    assert items["../outside"]["images"] == []
    q = run.read_table("quarantine")
    assert set(q["stage"].to_pylist()) == {"ingest"}
    assert {"../outside#0", "i5#0", "i6#0", "i7#0", "i4", "i1", "u1|i2"} <= set(
        q["key"].to_pylist()
    )
    assert all(q["detail"].to_pylist())


@pytest.mark.slow
def test_demo_stage_rerun_after_crash_rewrites_without_duplicates(ray_local, tmp_path):
    ingest = {"format": "demo", "demo_users": 50, "demo_items": 24, "num_shards": 2}
    cfg, run, s = _run(tmp_path, "run", ingest)
    check_counts(s)
    assert s["items"]["written"] == 24 and s["interactions"]["written"] > 6 * 50
    items, inter = run.read_table("items"), run.read_table("interactions")
    # simulate a crash after partial writes: no marker, stray files in the output tables
    run.clear_stage("ingest")
    run.write_table("items", items.slice(0, 5), "left-over-from-a-crash")
    run.write_table("quarantine/ingest", _quarantine_row(), "left-over-from-a-crash")
    s2 = run_ingest(cfg, run)
    assert s2["items"] == s["items"] and s2["interactions"] == s["interactions"]
    key = [("item_id", "ascending")]
    assert run.read_table("items").sort_by(key).equals(items.sort_by(key))
    key = [("user_id", "ascending"), ("timestamp", "ascending")]
    assert run.read_table("interactions").sort_by(key).equals(inter.sort_by(key))
    assert not run.table_files("quarantine/ingest")


def _quarantine_row() -> pa.Table:
    from mllm_msr.data import schema

    return pa.table(
        {"stage": ["ingest"], "source": ["x"], "key": ["k"], "reason": ["r"], "detail": ["d"]},
        schema=schema.QUARANTINE,
    )


def _amazon_ingest(root: str) -> dict:
    """The ``ingest`` section for the Amazon test dataset under ``root`` (its image URLs point to
    the test server on loopback)."""
    return {
        "format": "amazon",
        "root": root,
        "http_timeout_s": 0.5,
        "http_retries": 1,
        "http_allow_hosts": ["127.0.0.1"],  # the test server is on loopback
        "http_concurrency": 4,
        "images": IMAGES,
    }


@pytest.mark.slow
def test_amazon_stage_fetches_urls_with_failures(ray_local, tmp_path, amazon_root):
    _, run, s = _run(tmp_path, "run", _amazon_ingest(str(amazon_root)))
    check_counts(s)
    assert s["items"]["quarantined_by_reason"] == {"bad_json": 1, "empty_text": 1}
    assert (s["images"]["read"], s["images"]["written"]) == (4, 1)
    assert s["images"]["quarantined_by_reason"] == {
        "corrupt_image": 1,
        "fetch_failed": 1,
        "http_error": 1,
    }
    assert s["interactions"]["quarantined_by_reason"] == {
        "bad_json": 1,
        "bad_timestamp": 1,
        "duplicate_interaction": 1,
        "missing_id": 1,
    }
    inter = run.read_table("interactions").sort_by("timestamp").to_pylist()
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in inter] == [
        ("A", "P1", 1_600_000_000),
        ("A", "P2", 1_600_000_100),
        ("B", "P3", 1_600_000_300),
    ]


@pytest.mark.slow
def test_generic_stage_with_required_images_then_prepare(ray_local, tmp_path):
    from mllm_msr.stages.prepare import run_prepare

    root = tmp_path / "shop"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(png())
    (root / "imgs" / "b.png").write_bytes(png(colour=(0, 200, 0)))
    (root / "items.csv").write_text(
        "item_id,title,description,image\n"
        "g1,Lamp,bright,imgs/a.png\n"
        "g2,Chair,,imgs/b.png|imgs/missing.png\n"
        "g3,Hack,,../../etc/passwd\n"  # path_escape -> no usable image -> item quarantined
        "g4,Bare,,\n"  # no image while images are required
    )
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u1", "u2", "u2", "u2", "u1"],
                "item_id": ["g1", "g2", "g1", "g1", "zz", "g3"],
                "timestamp": [1000, 2000, 3000, 3000, 4000, 5000],
            }
        ),
        root / "inter.parquet",
    )
    ingest = {
        "format": "generic",
        "root": str(root),
        "interactions": "inter.parquet",
        "items": "items.csv",
        "image_column": "image",
        "require_images": True,
        "timestamp_unit": "ms",
        "images": IMAGES,
    }
    cfg, run, s = _run(tmp_path, "run", ingest)
    check_counts(s)
    assert s["items"]["quarantined_by_reason"] == {"no_image": 2}
    assert s["images"]["quarantined_by_reason"] == {"missing_image": 1, "path_escape": 1}
    assert s["interactions"]["quarantined_by_reason"] == {"duplicate_interaction": 1}
    assert max(run.read_table("interactions")["timestamp"].to_pylist()) == 5

    cfg = config_from_dict({"run_dir": cfg.run_dir, "prepare": {"user_core": 2, "item_core": 1}})
    p = run_prepare(cfg, run)
    assert p["quarantined_by_reason"] == {"unknown_item": 2}  # zz, and g3 (quarantined item)
    assert p["rows_in"] == p["rows_out"] + p["quarantined"] + p["kcore"]["interactions_filtered"]
    assert (p["users"], p["items"], p["interactions"]) == (1, 2, 2)
    q = run.read_table("quarantine/prepare")
    assert sorted(q["key"].to_pylist()) == ["u1|g3", "u2|zz"]


# --------------------------------------------------------------------------- bad rows, never fatal

# Small catalogs with one bad line (line 3) followed by good lines; each case names the file the
# bad line goes into, the quarantine reason, the table it is counted in and where it is (a
# "file:line" key, or a string of the quarantine key / detail).
ITEMS_CSV = [b"item_id,title,image", b"g1,Lamp,a.png", b"g2,Chair,b.png", b"g3,Desk,a.png"]
INTER_CSV = [b"user_id,item_id,timestamp", b"u1,g1,100", b"u1,g2,200", b"u2,g1,300", b"u2,g3,400"]
PAIRS_TSV = [b"u1\tg1 g2", b"u2\tg1 g3", b"u4\tg2"]
REVIEWS = [
    json.dumps({"user_id": u, "parent_asin": i, "timestamp": t}).encode()
    for u, i, t in [("u1", "g1", 1000), ("u1", "g2", 2000), ("u2", "g1", 3000), ("u2", "g3", 4000)]
]
META = [
    json.dumps({"parent_asin": g, "title": t}).encode()
    for g, t in [("g1", "L"), ("g2", "C"), ("g3", "D")]
]


def _case(name, bad, reason, file="inter.csv", kind="interactions", where=None, fmt="generic"):
    """A bad-row case: ``bad`` becomes line 3 of ``file``; ``where`` is the quarantine key (or a
    string of its detail), by default ``<file>:3``."""
    return pytest.param(fmt, file, bad, kind, reason, where or f"{file}:3", id=name)


BAD_ROWS = [
    _case("csv_extra_column", b"u3,g1,500,surplus", "malformed_row"),
    _case("csv_missing_column", b"u3,g1", "malformed_row"),
    _case("csv_unterminated_quote", b'u3,"g1,500', "malformed_row"),
    _case("csv_not_utf8", b"u3,g\xff1,500", "not_utf8"),
    _case("csv_items_unterminated_quote", b'g9,"Lamp,a.png', "malformed_row", "items.csv", "items"),
    _case("csv_items_not_utf8", b"g9,Caf\xe9,a.png", "not_utf8", "items.csv", "items"),
    _case("tsv_not_utf8", b"u3\tg\xff1 g2", "not_utf8", "pairs.tsv", fmt="microlens"),
    _case("jsonl_not_utf8", b'{"user_id": "u\xff"}', "not_utf8", "Toys.jsonl", fmt="amazon"),
    _case(
        "jsonl_meta_not_utf8",
        b'{"title": "\xfe"}',
        "not_utf8",
        "meta_Toys.jsonl",
        "items",
        fmt="amazon",
    ),
    _case("timestamp_1e30", b"u3,g1,1e30", "bad_timestamp"),
    _case("timestamp_negative", b"u3,g1,-5", "bad_timestamp"),
    _case("timestamp_nan", b"u3,g1,nan", "bad_timestamp"),
    _case("timestamp_text", b"u3,g1,soon", "bad_timestamp"),
    _case("image_dot", b"g9,Dot,.", "bad_image_path", "items.csv", "images", "g9#0"),
    _case("image_dotdot", b"g9,Up,..", "path_escape", "items.csv", "images", "g9#0"),
    _case("image_directory", b"g9,Dir,sub", "bad_image_path", "items.csv", "images", "g9#0"),
    _case("image_escape", b"g9,Out,../outside.png", "path_escape", "items.csv", "images", "g9#0"),
]


def _bad_row_dataset(root, fmt: str, file: str, bad: bytes) -> dict:
    """Write the dataset of ``fmt`` with ``bad`` as line 3 of ``file``; return the ingest config."""
    files = {
        "generic": {"items.csv": ITEMS_CSV, "inter.csv": INTER_CSV},
        "microlens": {
            "titles.csv": [b"item,title", b"g1,Lamp", b"g2,Chair"],
            "pairs.tsv": PAIRS_TSV,
        },
        "amazon": {"meta_Toys.jsonl": META, "Toys.jsonl": REVIEWS},
    }[fmt]
    (root / "imgs" / "sub").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(png())
    (root / "imgs" / "b.png").write_bytes(png(colour=(0, 200, 0)))
    (root / "outside.png").write_bytes(png())
    for name, lines in files.items():
        lines = lines[:2] + [bad] + lines[2:] if name == file else lines
        (root / name).write_bytes(b"\n".join(lines) + b"\n")
    ingest = {"format": fmt, "root": str(root), "images": IMAGES, "num_shards": 1}
    if fmt == "generic":
        ingest.update(items="items.csv", interactions="inter.csv", image_column="image")
        ingest["image_dir"] = "imgs"
    return ingest


@pytest.mark.slow
@pytest.mark.parametrize("fmt, file, bad, kind, reason, where", BAD_ROWS)
def test_bad_row_is_quarantined_not_fatal(ray_local, tmp_path, fmt, file, bad, kind, reason, where):
    root = tmp_path / "data"
    _, run, s = _run(tmp_path, "run", _bad_row_dataset(root, fmt, file, bad))
    check_counts(s)
    # every data line of the input is read once: the bad line, and every good line after it
    data_lines = {
        "generic": (len(ITEMS_CSV) - 1, len(INTER_CSV) - 1),
        "microlens": (2, 5),  # pairs: one interaction per item of a line
        "amazon": (3, len(REVIEWS)),
    }[fmt]
    n_items, n_inter = data_lines
    extra = {"items": (1, 0), "images": (1, 0), "interactions": (0, 1)}[kind]
    assert s["items"]["read"] == n_items + extra[0]
    assert s["interactions"]["read"] == n_inter + extra[1]
    q = run.read_table("quarantine").to_pylist()
    hits = [r for r in q if r["reason"] == reason and (where == r["key"] or where in r["detail"])]
    assert len(hits) == 1, q
    assert s[kind]["quarantined_by_reason"].get(reason) == 1
    assert hits[0]["source"].split(":")[0] == kind and hits[0]["detail"]
    # the good rows around the bad one are all written
    inter = {(r["user_id"], r["item_id"]) for r in run.read_table("interactions").to_pylist()}
    good_inter = {
        "generic": {("u1", "g1"), ("u1", "g2"), ("u2", "g1"), ("u2", "g3")},
        "microlens": {("u1", "g1"), ("u1", "g2"), ("u2", "g1"), ("u2", "g3"), ("u4", "g2")},
        "amazon": {("u1", "g1"), ("u1", "g2"), ("u2", "g1"), ("u2", "g3")},
    }[fmt]
    assert inter == good_inter
    items = {r["item_id"]: r for r in run.read_table("items").to_pylist()}
    assert {"g1", "g2"} <= set(items)
    if fmt == "generic":
        assert {"g3"} <= set(items) and len(items["g3"]["images"]) == 1
    if kind == "images":  # the item stays, text-only
        assert items["g9"]["images"] == []


# --------------------------------------------------------------------------- raw data on S3


def _upload(s3_server, local_root, name: str) -> str:
    """Copy the folder ``local_root`` to ``s3://<bucket>/<name>`` on the moto server."""
    import pyarrow.fs as pafs

    uri = f"s3://{s3_server['bucket']}/{name}"
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(
        str(local_root), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
    return uri


def test_raw_files_and_images_read_from_s3(s3_server, microlens_root):
    from mllm_msr.data.images import ImageError, read_image_file
    from mllm_msr.data.ingest import files
    from mllm_msr.data.ingest.common import resolve
    from mllm_msr.data.ingest.readers import csv_header

    root = _upload(s3_server, microlens_root, "raw-fast")
    assert files.is_remote(root) and files.is_dir(root)
    assert files.glob(root, "*pairs.tsv") == [f"{root}/pairs.tsv"]
    assert resolve(root, "covers") == f"{root}/covers"
    assert csv_header(f"{root}/titles.csv") == ["item", "title"]
    covers = f"{root}/covers"
    assert (
        read_image_file(covers, "i1.png", 100_000)
        == (microlens_root / "covers/i1.png").read_bytes()
    )
    for ref, reason in [
        ("../outside.png", "path_escape"),
        ("/etc/passwd", "path_escape"),
        ("nope.png", "missing_image"),
        (".", "bad_image_path"),
    ]:
        with pytest.raises(ImageError) as err:
            read_image_file(covers, ref, 100_000)
        assert err.value.reason == reason, ref
    big = (microlens_root / "covers/i7.png").stat().st_size
    with pytest.raises(ImageError, match="oversized_image|max_bytes"):
        read_image_file(covers, "i7.png", big - 1)
    with pytest.raises(FileNotFoundError, match=r"ingest\.root='s3://.*/absent'.*does not exist"):
        files.check_root(f"s3://{s3_server['bucket']}/absent", "microlens")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_microlens_ingest_from_s3_gives_the_tables_of_the_local_copy(
    ray_s3, s3_server, tmp_path, microlens_root
):
    ingest = {
        "format": "microlens",
        "interactions": "pairs.tsv",
        "items": "titles.csv",
        "image_dir": "covers",
        "images": IMAGES,
        "num_shards": 2,
    }
    root = _upload(s3_server, microlens_root, "raw-microlens")
    _, local_run, local = _run(tmp_path, "local", {**ingest, "root": str(microlens_root)})
    _, s3_run, remote = _run(tmp_path, "s3", {**ingest, "root": root})
    check_counts(remote)
    for kind in ("items", "images", "interactions"):
        assert remote[kind] == local[kind], kind
    for table, key in (("items", "item_id"), ("interactions", "user_id")):
        a, b = local_run.read_table(table), s3_run.read_table(table)
        order = [(key, "ascending")] + ([("timestamp", "ascending")] if key == "user_id" else [])
        assert a.sort_by(order).equals(b.sort_by(order)), table
    # The quarantine names the same rows for the same reasons (details name the folders).
    cols = ["stage", "source", "key", "reason"]
    qa = local_run.read_table("quarantine").select(cols).sort_by([(c, "ascending") for c in cols])
    qb = s3_run.read_table("quarantine").select(cols).sort_by([(c, "ascending") for c in cols])
    assert qa.equals(qb) and qa.num_rows >= 7

    with pytest.raises(FileNotFoundError, match=r"ingest\.root="):
        _run(tmp_path, "absent", {**ingest, "root": f"s3://{s3_server['bucket']}/no-such-raw"})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_amazon_and_generic_ingest_read_their_files_from_s3(
    ray_s3, s3_server, tmp_path, amazon_root
):
    """The amazon and generic readers take ``ingest.root=s3://...`` (files written by the test
    to the moto server): the same counts and rows as their local-path tests above."""
    amazon = _amazon_ingest(_upload(s3_server, amazon_root, f"raw-amazon-{tmp_path.name}"))
    _, run, s = _run(tmp_path, "amazon", amazon)
    check_counts(s)
    assert s["items"]["quarantined_by_reason"] == {"bad_json": 1, "empty_text": 1}
    assert (s["images"]["read"], s["images"]["written"]) == (4, 1)
    assert s["interactions"]["quarantined_by_reason"] == {
        "bad_json": 1,
        "bad_timestamp": 1,
        "duplicate_interaction": 1,
        "missing_id": 1,
    }
    inter = run.read_table("interactions").sort_by("timestamp").to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in inter] == [("A", "P1"), ("A", "P2"), ("B", "P3")]

    shop = tmp_path / "shop"
    (shop / "imgs").mkdir(parents=True)
    (shop / "imgs" / "a.png").write_bytes(png())
    (shop / "items.csv").write_text(
        "item_id,title,image\ng1,Lamp,imgs/a.png\ng2,Chair,imgs/missing.png\ng3,Hack,../x.png\n"
    )
    pq.write_table(
        pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["g1", "g2", "g1"], "ts": [1, 2, 3]}),
        shop / "inter.parquet",
    )
    generic = {
        "format": "generic",
        "root": _upload(s3_server, shop, f"raw-shop-{tmp_path.name}"),
        "interactions": "inter.parquet",
        "items": "items.csv",
        "image_column": "image",
        "timestamp_column": "ts",
        "images": IMAGES,
    }
    _, run, s = _run(tmp_path, "generic", generic)
    check_counts(s)
    assert s["images"]["quarantined_by_reason"] == {"missing_image": 1, "path_escape": 1}
    items = {r["item_id"]: r for r in run.read_table("items").to_pylist()}
    assert sorted(items) == ["g1", "g2", "g3"] and len(items["g1"]["images"]) == 1
    assert items["g1"]["images"][0][:2] == b"\xff\xd8"  # read from S3, normalized to JPEG
    assert items["g2"]["images"] == items["g3"]["images"] == []  # text-only, images optional
    assert run.read_table("interactions").num_rows == 3
