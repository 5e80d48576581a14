"""Readable metrics tables: one row per method, metrics ×100 as in the paper.

>>> print(format_metrics_table({"popularity": {"auc": 0.5, "hr@5": 0.25, "n_users": 4}},
...                            metrics=["auc", "hr@5"]))
| method | AUC | HR@5 | users |
|---|---:|---:|---:|
| popularity | 50.00 | 25.00 | 4 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from mllm_msr.metrics import DEFAULT_KS, metric_names


def metric_label(name: str) -> str:
    """Display name of a metric key: ``auc`` → ``AUC``, ``ndcg@5`` → ``NDCG@5``."""
    return name.upper()


def format_metrics_table(
    results: Mapping[str, Mapping[str, float]],
    *,
    metrics: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    ci: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    fmt: Literal["markdown", "text"] = "markdown",
    scale: float = 100.0,
    digits: int = 2,
) -> str:
    """Format ``{method: metrics dict}`` (as :func:`mllm_msr.metrics.evaluate_scores` returns).

    Args:
        results: methods in display order, each a dict of metric values in [0, 1].
        metrics: metric keys to show (default: all of :func:`metric_names` for ``ks``).
        ks: cut-offs used for the default ``metrics``.
        ci: optional ``{method: {metric: (low, high)}}`` shown as ``value [low, high]``.
        fmt: ``markdown`` (a pipe table) or ``text`` (space-aligned columns).
        scale: factor applied to every metric (100: the paper's percentages).
        digits: decimals shown.

    A missing metric shows as ``-``; a ``users`` column shows ``n_users`` when any method has it.
    """
    metrics = list(metrics) if metrics is not None else metric_names(ks)
    with_users = any("n_users" in m for m in results.values())
    header = ["method"] + [metric_label(m) for m in metrics] + (["users"] if with_users else [])

    rows = []
    for method, values in results.items():
        row = [method]
        for name in metrics:
            row.append(_cell(values.get(name), (ci or {}).get(method, {}).get(name), scale, digits))
        if with_users:
            n = values.get("n_users")
            row.append("-" if n is None else str(int(n)))
        rows.append(row)

    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    if fmt == "text":
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join([first, *rest])

        return "\n".join(
            [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
        )
    raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")


def _cell(
    value: float | None, interval: tuple[float, float] | None, scale: float, digits: int
) -> str:
    if value is None or value != value:  # missing or NaN
        return "-"
    text = f"{value * scale:.{digits}f}"
    if interval is not None:
        low, high = interval
        text += f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
    return text
