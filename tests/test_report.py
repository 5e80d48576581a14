"""The per-run report, provenance, bootstrap intervals, the portable adapter and telemetry.

All fast: a synthetic run directory (score tables, stage records), no engine, no Ray.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mllm_msr import provenance
from mllm_msr.config import PipelineConfig, config_from_dict
from mllm_msr.metrics import bootstrap_ci, bootstrap_methods, evaluate_scores, paired_bootstrap_diff
from mllm_msr.report import SECTIONS, build_report, write_report
from mllm_msr.runtime import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(method: str, n_users: int, strength: float, seed: int) -> pa.Table:
    """One positive and 9 negatives per user; the positive's score shifted by ``strength``."""
    rng = np.random.default_rng(seed)
    users, items, labels, scores = [], [], [], []
    for u in range(n_users):
        for c in range(10):
            users.append(f"u{u}")
            items.append(f"i{c}")
            labels.append(1 if c == 0 else 0)
            scores.append(float(rng.normal()) + (strength if c == 0 else 0.0))
    return pa.table(
        {
            "user_id": users,
            "item_id": items,
            "label": pa.array(labels, pa.int8()),
            "score": scores,
            "method": [method] * len(users),
        }
    )


def _tables(n_users: int = 40) -> dict[str, pa.Table]:
    return {
        "fine_tuned": _scores("fine_tuned", n_users, 2.0, 1),
        "popularity": _scores("popularity", n_users, 0.5, 2),
        "random": _scores("random", n_users, 0.0, 3),
    }


# ----------------------------------------------------------------------------- intervals


def test_bootstrap_methods_matches_the_single_method_functions():
    tables = _tables()
    intervals, paired = bootstrap_methods(tables, ks=[1, 5], n_boot=200, seed=7)
    assert set(intervals) == set(tables) and set(paired) == {"popularity", "random"}
    for method, table in tables.items():
        point = evaluate_scores(table, ks=[1, 5])
        ci = bootstrap_ci(table, ks=[1, 5], n_boot=200, seed=7)
        for name, (lo, hi) in ci.items():
            got = intervals[method][name]
            assert got["value"] == pytest.approx(point[name])
            assert (got["lo"], got["hi"]) == pytest.approx((lo, hi))
            assert got["lo"] <= got["value"] <= got["hi"] or name == "auc"
    diff = paired_bootstrap_diff(
        tables["fine_tuned"], tables["random"], ks=[1, 5], n_boot=200, seed=7
    )
    for name, (d, lo, hi) in diff.items():
        assert (paired["random"][name]["diff"], paired["random"][name]["lo"]) == pytest.approx(
            (d, lo)
        )
        assert paired["random"][name]["hi"] == pytest.approx(hi)
    # the strong model beats random: the paired interval of HR@5 lies above 0
    assert paired["random"]["hr@5"]["lo"] > 0


def test_bootstrap_methods_is_seeded_and_compares_on_shared_users():
    tables = _tables(30)
    a = bootstrap_methods(tables, ks=[1], n_boot=100, seed=3)
    assert a == bootstrap_methods(tables, ks=[1], n_boot=100, seed=3)
    assert a != bootstrap_methods(tables, ks=[1], n_boot=100, seed=4)
    # the fine-tuned model misses 5 users (quarantined): differences use the 25 shared users
    ft = tables["fine_tuned"]
    keep = pa.array([u not in {f"u{i}" for i in range(5)} for u in ft["user_id"].to_pylist()])
    _, paired = bootstrap_methods(
        {"fine_tuned": ft.filter(keep), "random": tables["random"]}, ks=[1], n_boot=50, seed=0
    )
    shared = tables["random"].filter(keep)
    want = (
        evaluate_scores(ft.filter(keep), ks=[1])["hr@1"] - evaluate_scores(shared, ks=[1])["hr@1"]
    )
    assert paired["random"]["hr@1"]["diff"] == pytest.approx(want)
    # without the reference there are no paired differences
    assert bootstrap_methods({"random": tables["random"]}, ks=[1], n_boot=10)[1] == {}


# ----------------------------------------------------------------------------- provenance


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    return model


def test_provenance_collects_git_packages_config_fingerprints_models_seeds_hardware(tmp_path):
    model = _model_dir(tmp_path)
    cfg = config_from_dict(
        {
            "name": "prov",
            "run_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "seed": 5,
            "stages": ["train", "evaluate"],
            "train": {"model": str(model), "seed": 3},
        }
    )
    run = RunDir(cfg.run_dir)
    run.write_stage_record("train", {"fingerprint": "f" * 32, "summary": {}})
    prov = provenance.collect(cfg, run)
    json.dumps(prov)  # JSON-able
    git = prov["git"]
    assert git is None or (re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and "dirty" in git)
    assert prov["packages"]["pyarrow"] == pa.__version__
    assert set(provenance.PACKAGES) <= set(prov["packages"])
    assert prov["config"]["name"] == "prov"
    assert prov["config_sha256"] == provenance.config_hash(prov["config"])
    other = provenance.config_hash({**prov["config"], "seed": 6})
    assert other != prov["config_sha256"]
    assert prov["stage_fingerprints"] == {"train": "f" * 32}
    import hashlib

    (entry,) = prov["models"]
    assert entry["key"] == "train.model" and entry["spec"] == str(model)
    want = hashlib.sha256(b"weights" * 100).hexdigest()
    assert entry["sha256"] == {"model.safetensors": want}
    assert prov["seeds"]["seed"] == 5 and prov["seeds"]["train.seed"] == 3
    assert prov["hardware"]["cpu_count"] >= 1 and prov["hardware"]["ram_bytes"] > 0
    assert isinstance(prov["hardware"]["gpus"], list)


def test_weight_checksums_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    model = _model_dir(tmp_path)
    cache = tmp_path / "cache" / provenance.CHECKSUM_CACHE
    files = [model / "model.safetensors"]
    first = provenance.weight_checksums(files, cache)
    assert cache.exists()
    # a cached digest is not recomputed: a wrong cached value proves the cache is read
    data = json.loads(cache.read_text())
    (key,) = data
    data[key]["sha256"] = "cached"
    cache.write_text(json.dumps(data))
    assert provenance.weight_checksums(files, cache) == {"model.safetensors": "cached"}
    (model / "model.safetensors").write_bytes(b"other weights")  # size changes: recomputed
    again = provenance.weight_checksums(files, cache)
    assert again["model.safetensors"] not in ("cached", first["model.safetensors"])


def test_provenance_without_a_checkout_or_local_hub_model(tmp_path):
    assert provenance.git_info(tmp_path) is None
    cfg = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "stages": ["train"],
            "train": {"model": "some-org/not-downloaded-model"},
        }
    )
    (entry,) = provenance.model_provenance(cfg)
    assert entry["sha256"] is None and "not present locally" in entry["note"]


# ----------------------------------------------------------------------------- report


def _synthetic_run(tmp_path: Path, sensitivity: bool = False) -> tuple[RunDir, dict]:
    run = RunDir(str(tmp_path / "run"))
    tables = _tables(30)
    for method, table in tables.items():
        run.write_table("scores", table, name=method)
    for stage, seconds in (("ingest", 1.5), ("prepare", 0.7), ("item_summaries", 12.0)):
        run.write_stage_record(
            stage,
            {
                "fingerprint": stage[:4] * 8,
                "summary": {"rows_in": 100, "rows_out": 98, "quarantined": 2, "seconds": seconds},
            },
        )
    losses = [[s, 0.9 - 0.05 * s] for s in range(1, 11)]
    run.write_stage_record(
        "train",
        {"fingerprint": "t" * 32, "summary": {"losses": losses, "val_loss": 0.5, "seconds": 30.0}},
    )
    ks = [1, 3, 5, 10]
    intervals, paired = bootstrap_methods(tables, ks=ks, n_boot=100, seed=0)
    metrics = {
        "split": "test",
        "ks": ks,
        "n_users": 30,
        "n_candidates": 300,
        "methods": {m: evaluate_scores(t, ks=ks) for m, t in tables.items()},
        "intervals": intervals,
        "paired_diff": paired,
        "bootstrap": {"n_boot": 100, "alpha": 0.05, "seed": 0},
        "provenance": provenance.collect(PipelineConfig(stages=["evaluate"]), run, checksums=False),
    }
    if sensitivity:
        metrics["user_sensitivity"] = {
            "own": {"auc": 0.8, "hr@1": 0.5},
            "swapped": {"auc": 0.6, "hr@1": 0.3},
        }
    return run, metrics


def _images(text: str) -> list[bytes]:
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
        out.append(png)
    return out


def test_report_is_self_contained_with_every_section(tmp_path):
    run, metrics = _synthetic_run(tmp_path)
    uri = write_report(run, metrics, title="demo", evaluate_summary={"rows_in": 300, "seconds": 2})
    text = Path(uri).read_text()
    assert 'src="http' not in text and "<script" not in text  # nothing fetched
    pngs = _images(text)
    assert len(pngs) == 4  # curves, loss, score histograms, stage times (no sensitivity)
    for key, heading in SECTIONS:
        if key == "sensitivity":
            assert heading not in text  # not computed: no section
        else:
            assert f'id="{key}"' in text and heading in text
    # the table shows every method with its interval, the paired differences every baseline
    assert "fine_tuned − <b>popularity</b>" in text and "fine_tuned − <b>random</b>" in text
    ft = metrics["intervals"]["fine_tuned"]["hr@5"]
    assert f"[{100 * ft['lo']:.2f}, {100 * ft['hi']:.2f}]" in text
    assert "evaluate" in text and "item_summaries" in text  # stage rows
    import io

    from PIL import Image

    for png in pngs:
        assert min(Image.open(io.BytesIO(png)).size) > 100


def test_report_shows_user_sensitivity_when_computed(tmp_path):
    run, metrics = _synthetic_run(tmp_path, sensitivity=True)
    text = build_report(run, metrics)
    assert 'id="sensitivity"' in text and len(_images(text)) == 5


def test_report_of_a_run_without_training_or_intervals(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    table = _scores("popularity", 10, 0.5, 0)
    run.write_table("scores", table, name="popularity")
    metrics = {
        "split": "test",
        "ks": [1, 5],
        "methods": {"popularity": evaluate_scores(table, ks=[1, 5])},
    }
    text = build_report(run, metrics)
    assert "No training losses recorded" in text and "No paired differences" in text
    assert len(_images(text)) == 2  # curves and histograms


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    """Every figure loads in a browser: a probe script (added to a copy) records each <img>'s
    decoded width after the load event, read back from the dumped DOM."""
    run, metrics = _synthetic_run(tmp_path, sensitivity=True)
    text = build_report(run, metrics)
    probe = (
        "<script>window.addEventListener('load',()=>{const w=[...document.images]"
        ".map(i=>i.complete?i.naturalWidth:0);document.body.setAttribute('data-widths',"
        "w.join(','));});</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text(text.replace("</body>", probe))
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-widths="([^"]*)"', out.stdout)
    assert match, out.stderr[-2000:]
    widths = [int(w) for w in match.group(1).split(",")]
    assert len(widths) == 5 and all(w > 100 for w in widths), widths


# ----------------------------------------------------------------------------- adapter


def test_adapter_is_portable_with_a_filled_model_card(tmp_path):
    from mllm_msr.adapter_card import finalize_adapter, model_card

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/someone/.cache/tiny/qwen2-vl", "r": 8})
    )
    (folder / "README.md").write_text("---\nbase_model: /abs\n---\n[More Information Needed]\n")
    cfg = config_from_dict({"name": "card", "train": {"model": "tiny:qwen2-vl", "max_steps": 7}})
    finalize_adapter(folder, cfg, {"steps": 7, "first_loss": 0.9, "final_loss": 0.4})
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": "tiny:qwen2-vl", "r": 8}
    card = (folder / "README.md").read_text()
    assert "More Information Needed" not in card and "/abs" not in card
    assert card.startswith("---\nbase_model: tiny:qwen2-vl\n")
    for part in (
        "# MLLM-MSR recommender adapter: card",
        "LoRA r=8",
        "ZeRO stage 2",
        "7 optimizer steps",
        "loss 0.9 → 0.4",
        "Not evaluated",
        "## Training configuration",
    ):
        assert part in card, part
    _, metrics = _synthetic_run(tmp_path)
    with_metrics = model_card(cfg, None, metrics)
    assert "| fine_tuned |" in with_metrics and "Not evaluated" not in with_metrics


# ----------------------------------------------------------------------------- telemetry


def test_telemetry_writes_tensorboard_events(tmp_path):
    import struct

    from tensorboardX.proto.event_pb2 import Event

    from mllm_msr.telemetry import Telemetry

    dest = tmp_path / "train" / "tensorboard"
    t = Telemetry(str(dest), run_name="x")
    for step in (1, 2, 3):
        t.log(step, **{"train/loss": 1.0 / step, "train/learning_rate": 1e-4, "val/loss": None})
    t.close()
    (events,) = list(dest.glob("events.out.tfevents.*"))
    tags = {}
    data = events.read_bytes()
    while data:  # TFRecord: length (u64), its crc, the record, its crc
        (n,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12 : 12 + n])
        data = data[16 + n :]
        for v in event.summary.value:
            tags.setdefault(v.tag, []).append(event.step)
    assert tags == {"train/loss": [1, 2, 3], "train/learning_rate": [1, 2, 3]}
    Telemetry(None).log(1, loss=1.0)  # other ranks: a no-op


# ----------------------------------------------------------------------------- evaluate stage


def test_evaluate_stage_writes_intervals_provenance_and_report(tmp_path):
    """The evaluate stage with baselines only (no model to load): metrics.json keeps its flat
    metrics and gains intervals, paired differences (none without fine_tuned) and provenance;
    report.html is written next to it."""
    from mllm_msr.data.schema import CANDIDATES, SEQUENCES
    from mllm_msr.stages.evaluate import run_evaluate

    rng = np.random.default_rng(0)
    seq, cand = [], []
    for u in range(40):
        split = "train" if u < 30 else "test"
        hist = [f"i{j}" for j in rng.choice(12, size=4, replace=False)]
        seq.append((f"u{u}", split, hist[:-1], hist[-1]))
        if split == "test":
            cand += [(f"u{u}", split, hist[-1], 1)]
            cand += [(f"u{u}", split, f"i{j}", 0) for j in range(12) if f"i{j}" not in hist][:5]
    users, splits, histories, targets = zip(*seq)
    sequences = pa.table(
        {"user_id": users, "split": splits, "history": histories, "target": targets},
        schema=SEQUENCES,
    )
    users, splits, items, labels = zip(*cand)
    candidates = pa.table(
        {"user_id": users, "split": splits, "item_id": items, "label": labels}, schema=CANDIDATES
    )
    cfg = config_from_dict(
        {
            "name": "evalrun",
            "run_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "seed": 3,
            "stages": ["evaluate"],
            "evaluate": {"baselines": ["popularity", "random"], "ks": [1, 3]},
        }
    )
    run = RunDir(cfg.run_dir)
    run.write_table("sequences", sequences)
    run.write_table("candidates", candidates)
    summary = run_evaluate(cfg, run, log=lambda *_: None)
    assert summary["methods"] == ["popularity", "random"]
    metrics = run.read_json("metrics.json")
    assert set(metrics["methods"]["popularity"]) >= {"auc", "hr@1", "ndcg@3", "n_users"}
    for method in ("popularity", "random"):
        for name in ("auc", "uauc", "hr@1", "hr@3", "mrr@1", "ndcg@3"):
            ci = metrics["intervals"][method][name]
            assert ci["value"] == pytest.approx(metrics["methods"][method][name])
            assert ci["lo"] <= ci["hi"]
    assert metrics["paired_diff"] == {}  # no fine-tuned model
    assert metrics["bootstrap"]["seed"] == 3 and metrics["bootstrap"]["n_boot"] == 1000
    prov = metrics["provenance"]
    assert prov["config"]["name"] == "evalrun" and prov["models"] == []
    text = (tmp_path / "run" / "report.html").read_text()
    assert 'id="metrics"' in text and len(_images(text)) == 3  # curves, histograms, stages
    assert not (tmp_path / "run" / "model_card.md").exists()


def test_a_portable_adapter_loads_for_scoring_by_the_configs_model(tmp_path):
    """Scoring loads the base by ``train.model`` and puts the adapter on it: the adapter's
    ``base_model_name_or_path`` (now a spec, not a path) is never opened."""
    import torch

    from mllm_msr.adapter_card import finalize_adapter
    from mllm_msr.config import LoraConfig
    from mllm_msr.engines.peft import apply_lora, save_adapter
    from mllm_msr.recommender.score import load_recommender
    from mllm_msr.tiny import resolve_model

    base = resolve_model("tiny:qwen2")
    torch.manual_seed(0)
    model = apply_lora(load_recommender(base, None), LoraConfig(r=4))
    with torch.no_grad():  # a non-trivial adapter (lora_B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    cfg = config_from_dict({"train": {"model": "tiny:qwen2", "family": "qwen2"}})
    finalize_adapter(tmp_path / "adapter", cfg)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny:qwen2"
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    loaded = load_recommender(base, str(tmp_path / "adapter"))
    plain = load_recommender(base, None)
    with torch.no_grad():
        want, got, without = (m(input_ids=ids).logits for m in (model, loaded, plain))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, without)  # the adapter is applied
