"""Readable metrics tables (one row per method, metrics ×100 as in the paper) and the per-run
report ``report.html`` (:func:`write_report`, called by the evaluate stage): self-contained
(matplotlib figures embedded as base64 PNGs), with the metrics and their bootstrap intervals,
paired differences of the fine-tuned model to each baseline, HR@k / NDCG@k curves, training and
validation loss, score histograms, user sensitivity (when computed), stage times and counts, and
the run's provenance.

>>> print(format_metrics_table({"popularity": {"auc": 0.5, "hr@5": 0.25, "n_users": 4}},
...                            metrics=["auc", "hr@5"]))
| method | AUC | HR@5 | users |
|---|---:|---:|---:|
| popularity | 50.00 | 25.00 | 4 |
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Literal

import pyarrow as pa

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


# =========================================================================== per-run report

REPORT_FILE = "report.html"
SECTIONS = (
    ("metrics", "Metrics with 95% bootstrap intervals"),
    ("paired", "Fine-tuned model vs each baseline (paired differences)"),
    ("curves", "HR@k and NDCG@k"),
    ("training", "Training and validation loss"),
    ("scores", "Score distributions (positives vs negatives)"),
    ("sensitivity", "User sensitivity (own vs swapped preference)"),
    ("stages", "Stage times and counts"),
    ("provenance", "Provenance"),
)
"""Section ids and headings of ``report.html``, in order (``sensitivity`` only when computed)."""
METHOD_ORDER = ("fine_tuned", "zero_shot", "sasrec", "popularity", "random")


def _figure(width: float = 7.0, height: float = 3.6):
    """A matplotlib figure on the Agg canvas (no pyplot: no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    import base64
    import html

    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def curves_figure(methods: Mapping[str, Mapping], ks: Sequence[int], intervals=None):
    """HR@k and NDCG@k against k, one line per method (bars: 95% intervals when given)."""
    fig = _figure(8.0, 3.4)
    axes = fig.subplots(1, 2)
    for ax, family in zip(axes, ("hr", "ndcg")):
        for method, values in methods.items():
            ys = [values.get(f"{family}@{k}", float("nan")) for k in ks]
            ci = (intervals or {}).get(method, {})
            if all(f"{family}@{k}" in ci for k in ks):
                lo = [ys[i] - ci[f"{family}@{k}"]["lo"] for i, k in enumerate(ks)]
                hi = [ci[f"{family}@{k}"]["hi"] - ys[i] for i, k in enumerate(ks)]
                ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
            else:
                ax.plot(ks, ys, marker="o", label=method)
        ax.set_xlabel("k")
        ax.set_ylabel(f"{family.upper()}@k")
        ax.set_xticks(list(ks))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def loss_figure(losses: Sequence[Sequence[float]], val_loss: float | None):
    """Training loss per optimizer step; the validation loss (end of training) as a point."""
    fig = _figure(7.0, 3.2)
    ax = fig.subplots()
    steps = [s for s, _ in losses]
    ax.plot(steps, [v for _, v in losses], marker="." if len(steps) < 50 else None, label="train")
    if val_loss is not None and steps:
        ax.scatter([steps[-1]], [val_loss], color="C3", zorder=3, label="validation (end)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def score_histograms_figure(tables: Mapping[str, pa.Table]):
    """Per method, the distribution of scores of positive and of negative candidates."""
    import numpy as np

    n = len(tables)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (method, table) in zip(axes, tables.items()):
        score = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=float)
        label = np.asarray(table.column("label").to_numpy(zero_copy_only=False)).astype(bool)
        finite = np.isfinite(score)
        score, label = score[finite], label[finite]
        lo, hi = (score.min(), score.max()) if len(score) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        for mask, name, color in ((~label, "negatives", "C0"), (label, "positives", "C1")):
            if mask.any():
                ax.hist(score[mask], bins=bins, density=True, alpha=0.55, color=color, label=name)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    return fig


def stages_figure(stages: Mapping[str, Mapping]):
    """Seconds per stage (horizontal bars)."""
    names = [s for s, v in stages.items() if isinstance(v.get("seconds"), int | float)]
    fig = _figure(7.0, 0.45 * max(len(names), 1) + 1.0)
    ax = fig.subplots()
    ax.barh(names[::-1], [stages[s]["seconds"] for s in names][::-1], color="C2")
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    return fig


def sensitivity_figure(sens: Mapping):
    """Own vs swapped preference: grouped bars per metric (when both are dicts of numbers)."""
    import numpy as np

    own, swapped = sens.get("own", {}), sens.get("swapped", {})
    names = [k for k in own if isinstance(own.get(k), int | float) and k in swapped]
    fig = _figure(7.0, 3.0)
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [own[k] for k in names], 0.4, label="own preference")
    ax.bar(x + 0.2, [swapped[k] for k in names], 0.4, label="swapped preference")
    ax.set_xticks(x, [metric_label(k) for k in names])
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    import html

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows
    )  # cells are escaped by the callers (some carry markup)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ordered(by_method: Mapping) -> dict:
    """``by_method`` with the known methods first, in :data:`METHOD_ORDER`, then the rest."""
    known = [m for m in METHOD_ORDER if m in by_method]
    return {m: by_method[m] for m in known + sorted(set(by_method) - set(known))}


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{summary}</summary>{content}</details>"


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def _metrics_section(metrics: Mapping, names: Sequence[str]) -> str:
    intervals = metrics.get("intervals", {})
    rows = []
    for method, values in metrics["methods"].items():
        row = [f"<b>{method}</b>"]
        for name in names:
            ci = intervals.get(method, {}).get(name)
            cell = _pct(values.get(name))
            if ci:
                cell += f' <span class="ci">[{_pct(ci["lo"])}, {_pct(ci["hi"])}]</span>'
            row.append(cell)
        row.append(str(values.get("n_users", "-")))
        rows.append(row)
    boot = metrics.get("bootstrap", {})
    note = (
        f"<p>Values ×100; brackets: {100 * (1 - boot.get('alpha', 0.05)):.0f}% percentile "
        f"bootstrap interval over users ({boot.get('n_boot', '?')} resamples, seed "
        f"{boot.get('seed', '?')}).</p>"
        if intervals
        else "<p>Values ×100 (no bootstrap intervals recorded).</p>"
    )
    header = ["method", *[metric_label(n) for n in names], "users"]
    return _html_table(header, rows) + note


def _paired_section(metrics: Mapping, names: Sequence[str]) -> str:
    paired = metrics.get("paired_diff", {})
    if not paired:
        return "<p>No paired differences: the run has no fine-tuned model or no baseline.</p>"
    rows = []
    for other, diffs in paired.items():
        row = [f"fine_tuned − <b>{other}</b>"]
        for name in names:
            d = diffs.get(name)
            if d is None:
                row.append("-")
                continue
            sig = d["lo"] > 0 or d["hi"] < 0
            text = f'{100 * d["diff"]:+.2f} <span class="ci">[{100 * d["lo"]:+.2f}, {100 * d["hi"]:+.2f}]</span>'
            row.append(f'<span class="{"sig" if sig else ""}">{text}</span>')
        rows.append(row)
    return _html_table(["comparison", *[metric_label(n) for n in names]], rows) + (
        "<p>Differences ×100 with paired bootstrap 95% intervals (same user resamples for both "
        "methods); <span class='sig'>bold</span>: the interval excludes 0.</p>"
    )


def _stage_rows(stages: Mapping[str, Mapping]) -> list[list[str]]:
    rows = []
    for stage, s in stages.items():
        rows.append(
            [stage]
            + [
                "-" if s.get(k) is None else str(s.get(k))
                for k in ("rows_in", "rows_out", "quarantined", "seconds")
            ]
        )
    return rows


def _provenance_section(prov: Mapping | None) -> str:
    import html
    import json

    if not prov:
        return "<p>No provenance recorded.</p>"
    git = prov.get("git") or {}
    commit = git.get("commit") or "not a git checkout"
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    hw = prov.get("hardware", {})
    pk = ", ".join(f"{k} {v}" for k, v in (prov.get("packages") or {}).items() if v)
    models = "".join(
        f"<li><code>{html.escape(m['key'])}</code>: <code>{html.escape(m['spec'])}</code>"
        + (
            " — " + ", ".join(f"{f} sha256 {d[:12]}…" for f, d in m["sha256"].items())
            if m.get("sha256")
            else f" — {html.escape(m.get('note', 'no local weights'))}"
        )
        + "</li>"
        for m in prov.get("models", [])
    )
    items = [
        f"<li>git commit <code>{html.escape(commit)}</code>{dirty}</li>",
        f"<li>config sha256 <code>{prov.get('config_sha256', '-')[:16]}…</code></li>",
        f"<li>packages: {html.escape(pk)}</li>",
        f"<li>hardware: {html.escape(str(hw.get('cpu_model')))}, {hw.get('cpu_count')} cores, "
        f"{(hw.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM"
        + (f", GPUs: {html.escape(', '.join(hw['gpus']))}" if hw.get("gpus") else "")
        + "</li>",
        f"<li>seeds: {html.escape(json.dumps(prov.get('seeds', {})))}</li>",
    ]
    fps = prov.get("stage_fingerprints", {})
    details = (
        "<details><summary>stage fingerprints and models</summary><ul>"
        + "".join(f"<li>{s}: <code>{f}</code></li>" for s, f in fps.items())
        + models
        + "</ul></details>"
    )
    return "<ul>" + "".join(items) + "</ul>" + details


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.25em .6em;border-bottom:1px solid #eee;
text-align:right}td:first-child,th:first-child{text-align:left}.ci{color:#777;font-size:.85em}
.sig{font-weight:bold}img{max-width:100%}code{font-size:.9em}.muted{color:#777}
"""


def build_report(
    run,
    metrics: Mapping,
    *,
    title: str | None = None,
    evaluate_summary: Mapping | None = None,
) -> str:
    """The HTML text of a run's report (self-contained: figures are base64 PNG data URIs).

    ``run`` is the :class:`~mllm_msr.runtime.RunDir` (score tables under ``scores/``, stage
    records under ``_stages/``); ``metrics`` what the evaluate stage writes to ``metrics.json``
    (``methods``, ``ks``, and optionally ``intervals``, ``paired_diff``, ``bootstrap``,
    ``provenance``, ``user_sensitivity``). ``evaluate_summary`` stands in for the evaluate
    stage's own record, which is written after the stage returns.
    """
    import html

    import pyarrow.parquet as pq

    from mllm_msr.contract import ORDER

    ks = [int(k) for k in metrics.get("ks", DEFAULT_KS)]
    metrics = {  # methods in display order (metrics.json sorts its keys)
        **metrics,
        **{
            k: _ordered(metrics[k]) for k in ("methods", "intervals", "paired_diff") if k in metrics
        },
    }
    methods = metrics.get("methods", {})
    names = metric_names(ks)
    parts: dict[str, str] = {}

    # HR and NDCG in the main tables (they fit a page); every metric, MRR too, under "all".
    main = ["auc", "uauc", *[f"hr@{k}" for k in ks], *[f"ndcg@{k}" for k in ks]]
    parts["metrics"] = _metrics_section(metrics, main) + _details(
        "all metrics (MRR@k too)", _metrics_section(metrics, names)
    )
    parts["paired"] = _paired_section(metrics, main) + _details(
        "all metrics (MRR@k too)", _paired_section(metrics, names)
    )
    if methods:
        fig = curves_figure(methods, ks, metrics.get("intervals"))
        parts["curves"] = _img(_png(fig), "HR@k and NDCG@k per method")
    else:
        parts["curves"] = "<p>No methods were evaluated.</p>"

    train = run.stage_summary("train") or {}
    losses = train.get("losses") or []
    if losses:
        parts["training"] = _img(_png(loss_figure(losses, train.get("val_loss"))), "loss curves")
        parts["training"] += (
            f"<p>{train.get('steps')} steps; loss {train.get('first_loss')} → "
            f"{train.get('final_loss')}; validation loss {train.get('val_loss')}, "
            f"validation AUC {train.get('val_auc')} (1:1); exported step "
            f"{train.get('exported_step', train.get('steps'))}.</p>"
        )
    else:
        parts["training"] = "<p class='muted'>No training losses recorded (train not run).</p>"

    tables = {}
    for path in run.table_files("scores"):
        method = path.rsplit("/", 1)[-1][: -len(".parquet")]
        tables[method] = pq.read_table(path, columns=["label", "score"], filesystem=run.fs)
    tables = _ordered(tables)
    if tables:
        parts["scores"] = _img(_png(score_histograms_figure(tables)), "score histograms")
    else:
        parts["scores"] = "<p class='muted'>No score tables.</p>"

    sens = metrics.get("user_sensitivity")
    if sens:
        text = f"<pre>{html.escape(json.dumps(sens, indent=1, default=str))}</pre>"
        if isinstance(sens.get("own"), Mapping) and isinstance(sens.get("swapped"), Mapping):
            text = _img(_png(sensitivity_figure(sens)), "user sensitivity") + text
        parts["sensitivity"] = text

    stages = {}
    for stage in ORDER:
        s = run.stage_summary(stage)
        if stage == "evaluate" and evaluate_summary is not None:
            s = dict(evaluate_summary)
        if s is not None:
            stages[stage] = s
    if stages:
        parts["stages"] = _html_table(
            ["stage", "rows in", "rows out", "quarantined", "seconds"], _stage_rows(stages)
        )
        if any(isinstance(s.get("seconds"), int | float) for s in stages.values()):
            parts["stages"] = _img(_png(stages_figure(stages)), "stage times") + parts["stages"]
    else:
        parts["stages"] = "<p class='muted'>No stage records.</p>"
    parts["provenance"] = _provenance_section(metrics.get("provenance"))

    name = title or (metrics.get("provenance") or {}).get("config", {}).get("name") or "run"
    body = [
        f"<h1>MLLM-MSR run report: {html.escape(str(name))}</h1>",
        f"<p class='muted'>{html.escape(run.uri)} · split {metrics.get('split', '?')} · "
        f"{metrics.get('n_users', '?')} users · {metrics.get('n_candidates', '?')} candidates</p>",
    ]
    for key, heading in SECTIONS:
        if key in parts:
            body.append(
                f'<section id="{key}"><h2>{html.escape(heading)}</h2>{parts[key]}</section>'
            )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>MLLM-MSR report: {html.escape(str(name))}</title><style>{_CSS}</style></head>"
        "<body>" + "\n".join(body) + "</body></html>\n"
    )


def write_report(run, metrics: Mapping, **kwargs) -> str:
    """Write :func:`build_report` to ``<run_dir>/report.html``; returns its URI."""
    text = build_report(run, metrics, **kwargs)
    run.write_bytes_at(run.path(REPORT_FILE), text.encode())
    return run.uri_of(REPORT_FILE)
