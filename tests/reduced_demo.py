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


def on_cpu(cfg) -> list[str]:
    """Overrides that run a GPU config on this CPU machine at the reduced demo's scale: the
    demo catalog instead of the config's dataset, 2 Ray CPUs, CPU workers and actor pools, eager
    vLLM, few steps and tokens. Model sizes come from :func:`mllm_msr.tiny.twin_overrides`;
    processor settings (image sizes, max lengths, any-res grids), precision, ZeRO stage and
    LoRA settings stay the config's."""
    out = [
        "ingest.format=demo",
        "ingest.demo_users=48",
        "ingest.demo_items=40",
        "ingest.require_images=false",
        "ingest.num_shards=1",
        "ray.num_cpus=2",
        "train.use_gpu=false",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=1",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.eval_samples=4",
        "evaluate.max_users=2",
        "evaluate.user_sensitivity=false",  # doubles the scoring; tested on the demo config
        "evaluate.baselines=[popularity,zero_shot]",
        "prepare.max_users={}",
    ]
    for stage in ("item_summaries", "user_preferences"):
        out += [
            f"{stage}.engine.enforce_eager=true",
            f"{stage}.engine.max_num_seqs=64",
            f"{stage}.sampling.max_new_tokens=4",
            f"{stage}.pool.num_gpus=0",
            f"{stage}.pool.num_cpus=1",
            f"{stage}.pool.concurrency=1",
        ]
    out += ["evaluate.pool.num_gpus=0", "evaluate.pool.num_cpus=1", "evaluate.pool.concurrency=1"]
    return out
