"""Engine start time and throughput of the vLLM adapter on the tiny offline models.

For each tiny model: time to import vLLM and start the engine, generation throughput
(requests/s and generated tokens/s, greedy, a batch of distinct image or text prompts) and
Yes/No scoring throughput (fp32). CPU time is reported next to wall time, so that runs on a
busy machine can be told apart.

    .venv/bin/python bench/vllm_engine.py                         # all tiny models
    .venv/bin/python bench/vllm_engine.py --models tiny:qwen2-vl --requests 256 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = {"tiny:qwen2-vl": "qwen2_vl", "tiny:llava": "llava", "tiny:qwen2": "qwen2"}


class Timer:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _chats(family: str, n: int, kind: str):
    from PIL import Image

    from mllm_msr import prompts

    multimodal = prompts.family(family).multimodal
    chats = []
    for i in range(n):
        image = Image.new("RGB", (448, 448), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        if kind == "generate":
            chat = (
                prompts.item_summary_messages(image, f"Item {i}")
                if multimodal
                else prompts.preference_messages(None, [{"title": f"Item {i}", "summary": "red"}])
            )
        else:
            chat = prompts.recommender_messages(
                "likes red circles", f"Item {i}", with_image=multimodal, image=image
            )
        chats.append(chat)
    return chats


def bench_model(model: str, requests: int, new_tokens: int, cache_dir: str) -> dict:
    from mllm_msr.config import EngineConfig, SamplingConfig

    with Timer() as t_import:
        import vllm  # noqa: F401  (timed here, not inside the engine start)

        from mllm_msr.engines.vllm import VLLMEngine
    family = FAMILIES[model]
    cfg = EngineConfig(model=model, family=family, dtype="float32", max_model_len=1024)
    with Timer() as t_start:
        engine = VLLMEngine(cfg, cache_dir=cache_dir)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    engine.generate(_chats(family, 2, "generate"), sampling)  # warm-up
    gen_chats = _chats(family, requests, "generate")
    with Timer() as t_gen:
        out = engine.generate(gen_chats, sampling)
    score_chats = _chats(family, requests, "score")
    with Timer() as t_score:
        engine.score_yes_no(score_chats)
    with Timer() as t_close:
        engine.close()
    generated = sum(o.output_tokens for o in out)
    return {
        "model": model,
        "import_s": round(t_import.wall, 2),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "engine_start_s": round(t_start.wall, 2),
        "engine_start_cpu_s": round(t_start.cpu, 2),
        "requests": requests,
        "mean_prompt_tokens": round(sum(o.prompt_tokens for o in out) / len(out), 1),
        "new_tokens": new_tokens,
        "generate_s": round(t_gen.wall, 2),
        "generate_req_per_s": round(requests / t_gen.wall, 1),
        "generate_tok_per_s": round(generated / t_gen.wall, 1),
        "generate_cpu_s": round(t_gen.cpu, 2),
        "score_s": round(t_score.wall, 2),
        "score_req_per_s": round(requests / t_score.wall, 1),
        "score_cpu_s": round(t_score.cpu, 2),
        "close_s": round(t_close.wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        cache = args.cache_dir or tmp
        results = [bench_model(m, args.requests, args.new_tokens, cache) for m in args.models]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
