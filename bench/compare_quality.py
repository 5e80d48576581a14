"""Does a rerun of the quality benchmark reproduce its table? Compare two result JSON files.

For every method in both reports and every metric with a bootstrap interval (AUC, HR@5, MRR@5,
NDCG@5), prints both values, their difference, and whether the second value lies inside the
first run's 95% interval (the benchmark's "same seed -> same numbers within the reported
intervals"). Exit status 1 when a value falls outside, or a method is missing from one report.

    .venv/bin/python bench/compare_quality.py bench/results/quality_microlens.json other.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(first: dict, second: dict) -> tuple[list[str], bool]:
    """Markdown table lines and whether every value of ``second`` is inside ``first``'s CI."""
    lines = [
        "| method | metric | first | second | difference | inside first's 95% CI |",
        "|---|---|---:|---:|---:|---|",
    ]
    ok = True
    for method, intervals in first["ci"].items():
        if method not in second["methods"]:
            lines.append(f"| {method} | - | - | missing | - | no |")
            ok = False
            continue
        for metric, (lo, hi) in intervals.items():
            a = first["methods"][method][metric]
            b = second["methods"][method][metric]
            inside = lo <= b <= hi
            ok &= inside
            lines.append(
                f"| {method} | {metric} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} "
                f"| {'yes' if inside else 'NO'} |"
            )
    extra = sorted(set(second["methods"]) - set(first["ci"]))
    for method in extra:
        lines.append(f"| {method} | - | missing | - | - | no |")
        ok = False
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("first", type=Path, help="the reference run's JSON (its intervals are used)")
    p.add_argument("second", type=Path, help="the rerun's JSON")
    args = p.parse_args(argv)
    first, second = (json.loads(path.read_text()) for path in (args.first, args.second))
    lines, ok = compare(first, second)
    identical = first["methods"] == second["methods"]
    print("\n".join(lines))
    print(
        f"\nall inside: {ok}; every metric identical to the last digit: {identical} "
        f"(first finished {first.get('finished')}, second {second.get('finished')})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
