"""Weights on every node: a model folder published to object storage (the moto S3 server on
127.0.0.1, no mocks) and synced into an empty node-local cache, verified by sha256."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mllm_msr.config import ConfigError, check_model, config_from_dict
from mllm_msr.model_source import (
    MANIFEST,
    NODE_CACHE_ENV,
    ModelChecksumError,
    downloads,
    local_dir,
    publish_models,
    read_manifest,
)
from mllm_msr.provenance import _local_weights, weight_checksums
from mllm_msr.stages.item_summaries import check_engine_model
from mllm_msr.tiny import resolve_model

TINY = "tiny:qwen2.5-vl"


def _uri(s3_server) -> str:
    return f"s3://{s3_server['bucket']}/models/{uuid.uuid4().hex[:8]}/qwen2.5-vl"


def test_empty_cache_syncs_the_published_model_once_and_loads_it(s3_server, tmp_path):
    import torch

    from mllm_msr.families import load_model, load_processor, resolve

    src = resolve_model(TINY)
    uri = _uri(s3_server)
    manifest = publish_models(src, uri)
    assert "config.json" in manifest["files"] and read_manifest(uri) == manifest
    check_model("engine.model", uri)  # a published model passes the config check
    # The driver's pre-flight check of the summarizer reads the manifest, downloads nothing.
    engine = {"model": uri, "family": "qwen2_5_vl"}
    check_engine_model(config_from_dict({"item_summaries": {"engine": engine}}).item_summaries, "x")
    missing = config_from_dict({"item_summaries": {"engine": {**engine, "model": uri + "-x"}}})
    with pytest.raises(ValueError, match=rf"item_summaries\.engine\.model: .*no {MANIFEST}"):
        check_engine_model(missing.item_summaries, "x")

    cache = tmp_path / "node-cache"  # the empty disk of a new node
    # Provenance takes the digests from the manifest: nothing is downloaded onto the driver.
    weights = _local_weights(uri, str(cache))
    expected = weight_checksums(sorted(Path(src).glob("*.safetensors")))
    assert weights["path"] == uri and weights["sha256"] == expected and expected
    assert not cache.exists()
    with ThreadPoolExecutor(4) as pool:  # several actors of one node ask at the same time
        paths = set(pool.map(lambda _: resolve_model(uri, cache), range(4)))
    assert paths == {str(local_dir(uri, cache))}
    (path,) = paths
    leftovers = [p.name for p in (cache / "model_source").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-downloaded folder stays behind
    assert len(downloads(uri, cache)) == 1  # four processes, one download

    fam = resolve(path)
    synced, original = load_model(path, fam), load_model(src, fam)
    load_processor(path, fam)
    a, b = synced.state_dict(), original.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_node_cache_set_on_the_node_wins_over_the_run_cache(s3_server, tmp_path, monkeypatch):
    uri = _uri(s3_server)
    publish_models(resolve_model(TINY), uri)
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node"))
    assert resolve_model(uri, tmp_path / "run") == str(local_dir(uri, tmp_path / "node"))
    assert not (tmp_path / "run").exists() and len(downloads(uri, tmp_path / "node")) == 1


def test_a_corrupt_object_fails_the_checksum_and_leaves_no_model(s3_server, tmp_path):
    src = resolve_model(TINY)
    uri = _uri(s3_server)
    publish_models(src, uri)
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(f"{root}/config.json") as out:  # changed after publishing
        out.write(b'{"model_type": "qwen2_5_vl", "tampered": true}')
    with pytest.raises(ModelChecksumError, match=r"config\.json has sha256 .* publish the model"):
        resolve_model(uri, tmp_path)
    assert not local_dir(uri, tmp_path).exists()

    unpublished = uri + "-never"
    with pytest.raises(ConfigError, match=rf"train\.model: .*no {MANIFEST}.*model_source"):
        check_model("train.model", unpublished)


def test_prune_removes_synced_models_out_of_date_with_their_source(s3_server, tmp_path, capsys):
    import shutil

    from mllm_msr.model_source import main, prune

    src = resolve_model(TINY)
    republished, current = _uri(s3_server), _uri(s3_server)
    for uri in (republished, current):
        publish_models(src, uri)
    cache = tmp_path / "node"
    old, kept = (Path(resolve_model(u, cache)) for u in (republished, current))
    partial = old.parent / f".{old.name}-k1ll3d"  # a download killed midway
    partial.mkdir()
    changed = tmp_path / "v2"
    shutil.copytree(src, changed)
    (changed / "generation_config.json").write_text('{"max_new_tokens": 8}')
    publish_models(changed, republished)  # a new version of the model

    removed = prune(cache, log=lambda *_: None)
    assert removed == [old, partial] and not old.exists() and not partial.exists()
    assert kept.exists() and not downloads(republished, cache)
    assert prune(cache, keep=[], dry_run=True, log=lambda *_: None) == [kept] and kept.exists()

    main(["prune", "--cache-dir", str(cache), "--keep", current])
    assert kept.exists() and "removed 0 folder(s)" in capsys.readouterr().out
    fs, root = pafs.FileSystem.from_uri(current)
    fs.delete_file(f"{root}/{MANIFEST}")  # the source was withdrawn
    main(["prune", "--cache-dir", str(cache)])
    assert "holds no MANIFEST.json" in capsys.readouterr().out and not kept.exists()
    assert resolve_model(republished, cache) == str(old)  # the new version syncs
    assert json.loads((old / "generation_config.json").read_text()) == {"max_new_tokens": 8}
