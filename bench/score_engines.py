"""Benchmark: rows/s of the recommender's Yes/No scoring, transformers vs vLLM, same rows.

Scores ``--users`` x ``--candidates`` rows (MicroLens-like: a preference of ~60 words, a title,
``--history`` recent titles with the ``history`` prompt) with :class:`~mllm_msr.recommender.score.
YesNoScorer` (plain and with the shared prefix) and :class:`~mllm_msr.recommender.score.
VLLMYesNoScorer` (``evaluate.engine: vllm``), in this process (no Ray), fp32, and reports rows/s
and the largest score difference between the engines.

    .venv/bin/python bench/score_engines.py --model tiny:qwen2 --family qwen2
    .venv/bin/python bench/score_engines.py --model pkg:smollm2 --family smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_msr.config import EvaluateConfig, TrainConfig  # noqa: E402
from mllm_msr.recommender.score import VLLMYesNoScorer, YesNoScorer  # noqa: E402

WORDS = "drama comedy travel food music pets gaming sports dance cars fashion news".split()


def rows(users: int, candidates: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        pref = "The user appears to have a preference for " + " ".join(
            rng.choice(WORDS, size=60).tolist()
        )
        history = [" ".join(rng.choice(WORDS, size=4).tolist()) for _ in range(5)]
        for k in range(candidates):
            out.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{u}-{k}",
                    "label": int(k == 0),
                    "preference": pref,
                    "title": " ".join(rng.choice(WORDS, size=5).tolist()),
                    "summary": "",
                    "history_titles": history,
                }
            )
    return out


def timed(scorer, data) -> tuple[np.ndarray, float]:
    scorer.score_rows(data[:21])  # warm-up
    t0 = time.perf_counter()
    scores = scorer.score_rows(data)
    return scores, len(data) / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:qwen2")
    p.add_argument("--family", default="qwen2")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--candidates", type=int, default=21)
    p.add_argument("--prompt", default="history")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    train = TrainConfig(model=args.model, family=args.family, multimodal=False, prompt=args.prompt)
    data = rows(args.users, args.candidates)
    report = {"model": args.model, "rows": len(data), "load_before": os.getloadavg()}
    plain, report["transformers_rows_per_s"] = timed(YesNoScorer(args.model, None, train), data)
    shared = YesNoScorer(args.model, None, train, share_prefix=True)
    _, report["transformers_shared_prefix_rows_per_s"] = timed(shared, data)
    vllm = VLLMYesNoScorer(args.model, None, train, EvaluateConfig(engine="vllm"))
    try:
        got, report["vllm_rows_per_s"] = timed(vllm, data)
    finally:
        vllm.close()
    report["max_abs_score_diff"] = float(np.abs(got - plain).max())
    report["load_after"] = os.getloadavg()
    report = {
        k: (round(v, 2) if isinstance(v, float) and k.endswith("_per_s") else v)
        for k, v in report.items()
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
