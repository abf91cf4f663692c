"""A self-contained HTML report from saved `metrics.json` files (plots embedded as PNG data URIs).

Nothing is recomputed: the report reads what `alambic demo` or `alambic eval`
saved. One file, no external assets, so it can be mailed or attached to a PR.

    alambic report runs/demo-bbc
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from alambic.evaluate.ratios import versus_teacher
from alambic.durable import atomic_write_text
from alambic.errors import AlambicError, DataError

# key -> (label shown to the reader, how to format the value)
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "accuracy": ("Accuracy", "{:.2%}"),
    "macro_f1": ("Macro-F1", "{:.4f}"),
    "agreement": ("Agreement with teacher", "{:.2%}"),
    "ece": ("Expected calibration error (lower is better)", "{:.4f}"),
    "perplexity": ("Held-out perplexity", "{:.3f}"),
    "bits_per_byte": ("Held-out bits per byte (lower is better)", "{:.4f}"),
    "kl_to_teacher": ("KL(teacher || student) per token, nats", "{:.4f}"),
    "top1_agreement": ("Top-1 agreement with teacher", "{:.2%}"),
    "latency_ms": ("Latency per example, batch 1 (ms)", "{:.2f}"),
    "throughput_per_s": ("Throughput, batch 32 (examples/s, median ±IQR)", "{:.1f}"),
    "tokens_per_s_batch1": ("Generation, batch 1 (tokens/s, median ±IQR)", "{:.1f}"),
    "ttft_ms_batch1": ("Time to first token, batch 1 (ms)", "{:.1f}"),
    "tokens_per_s_batch8": ("Generation, batch 8 (tokens/s, median ±IQR)", "{:.1f}"),
    "ttft_ms_batch8": ("Time to first token, batch 8 (ms)", "{:.1f}"),
    "num_parameters": ("Parameters", "{:,.0f}"),
    "disk_mb": ("Size on disk (MB)", "{:.1f}"),
    "peak_memory_mb": ("Peak inference memory (MB)", "{:.1f}"),
    "eval_tokens": ("Scored tokens", "{:,.0f}"),
}

# A speed figure -> its spread (interquartile range over the median of interleaved rounds), shown as "±N%".
SPREAD_OF = {"throughput_per_s": "throughput_spread", "tokens_per_s_batch1": "tokens_per_s_spread_batch1",
             "tokens_per_s_batch8": "tokens_per_s_spread_batch8"}
# Keys that describe how a figure was measured: shown beside it, never as rows of their own.
MEASUREMENT_KEYS = frozenset(SPREAD_OF.values()) | {"throughput_rounds", "speed_rounds"}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.35em .7em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}.ret{color:#666;font-size:.85em}
.met{color:#17803d;font-weight:600}.unmet{color:#b3261e;font-weight:600}img{max-width:100%}.note{color:#555}
"""


def load_metrics(run_folder: str | Path) -> dict:
    folder = Path(run_folder)
    path = folder / "metrics.json" if folder.is_dir() else folder
    if not path.exists():
        raise DataError(
            f"no metrics.json in {str(folder)!r}",
            "run `alambic demo` or `alambic eval RUN` first: the report only renders saved metrics",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err})", "re-run `alambic eval` to rewrite it") from None
    if not isinstance(data, dict) or not data.get("models"):
        raise DataError(f"{path} has no evaluated models", "re-run `alambic eval` to rewrite it")
    return data


def format_value(key: str, value) -> str:
    if value is None:
        return "–"
    pattern = METRIC_LABELS.get(key, (key, "{:.4g}"))[1]
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return html.escape(str(value))


def metric_cell(key: str, metrics: dict) -> str:
    """The formatted value of `key`, with its measured spread ("475.3 ±4%") where one was saved."""
    cell = format_value(key, metrics.get(key))
    spread = metrics.get(SPREAD_OF.get(key, ""))
    if metrics.get(key) is not None and isinstance(spread, (int, float)):
        cell += f" ±{spread:.0%}"
    return cell


def metrics_table(run: dict) -> str:
    """Rows are metrics, columns are models; students show retention (vs the teacher) below each value."""
    names = list(run["models"])
    keys = [k for k in METRIC_LABELS if any(k in run["models"][n]["metrics"] for n in names)]
    keys += sorted({k for n in names for k in run["models"][n]["metrics"]} - set(keys) - MEASUREMENT_KEYS)
    header = "".join(f"<th>{html.escape(n)} <span class='ret'>({run['models'][n]['role']})</span></th>" for n in names)
    teacher = next((e["metrics"] for e in run["models"].values() if e["role"] == "teacher"), {})
    rows = []
    for key in keys:
        cells = []
        for name in names:
            entry = run["models"][name]
            cell = metric_cell(key, entry["metrics"])
            ratio = None if entry["role"] == "teacher" else versus_teacher(
                key, entry["metrics"].get(key), teacher.get(key))
            if ratio is not None:
                cell += f"<br><span class='ret'>{html.escape(ratio)}</span>"
            cells.append(f"<td>{cell}</td>")
        label = METRIC_LABELS.get(key, (key, ""))[0]
        rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{header}</tr>{''.join(rows)}</table>"


def _figure_html(figure, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AlambicError(
            "the HTML report needs matplotlib, which is not installed",
            "install the demo extra with `pip install -e '.[demo]'` or run `make demo`",
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff_plot(run: dict) -> str | None:
    """Quality against cost: one point per model, cost on the x axis."""
    quality = "accuracy" if run["task"] == "sequence_classification" else "bits_per_byte"
    costs = [c for c in ("latency_ms", "ttft_ms_batch1", "disk_mb", "num_parameters")
             if all(run["models"][n]["metrics"].get(c) is not None for n in run["models"])][:2]
    if not costs:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4), squeeze=False)
    for axis, cost in zip(axes[0], costs):
        for name, entry in run["models"].items():
            x, y = entry["metrics"][cost], entry["metrics"].get(quality)
            if y is None:
                continue
            # Models often share a point (same size): a legend stays readable where labels would overlap.
            teacher = entry["role"] == "teacher"
            axis.scatter(x, y, s=160 if teacher else 90, marker="*" if teacher else "o", label=name, alpha=0.8)
        axis.set_xlabel(METRIC_LABELS[cost][0])
        axis.set_ylabel(METRIC_LABELS[quality][0])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Quality vs cost (up-left is better)" if quality == "accuracy" else "Quality vs cost (down-left is better)")
    return _figure_html(figure, "quality versus cost")


def curves_plot(run: dict) -> str | None:
    """Training loss of each student (smoothed), and its held-out metric at eval steps."""
    curves = {name: history for name, history in (run.get("curves") or {}).items() if history}
    if not curves:
        return None
    plt = _pyplot()
    eval_key = "eval_accuracy" if run["task"] == "sequence_classification" else "eval_ce"
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, history) in enumerate(curves.items()):
        # Each run's KD term (solid) and hard-label CE term (dashed), where the run has them.
        color = f"C{index}"
        for term, style, label in (("kd", "-", "KD term"), ("ce", "--", "CE term")):
            points = [(r["step"], r[term]) for r in history if r.get(term)]
            if not points:
                continue
            steps, values = zip(*points)
            loss_axis.plot(steps, _smoothed(list(values)), style, color=color, label=f"{name}: {label}")
        points = [(r["step"], r[eval_key]) for r in history if eval_key in r]
        if points:
            eval_axis.plot(*zip(*points), marker="o", label=name)
    loss_axis.set(xlabel="step", ylabel="on train batches (smoothed)", title="training")
    eval_axis.set(xlabel="step", ylabel=eval_key.replace("_", " ") + " (validation)", title="validation during training")
    for axis in (loss_axis, eval_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    return _figure_html(figure, "training curves")


def _smoothed(values: list[float]) -> list[float]:
    window = max(1, len(values) // 20)
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def confusion_plot(run: dict, name: str) -> str | None:
    matrix = (run.get("confusion") or {}).get(name)
    if not matrix:
        return None
    plt = _pyplot()
    classes = run.get("class_names") or [str(i) for i in range(len(matrix))]
    figure, axis = plt.subplots(figsize=(5.5, 4.8))
    axis.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    for true, row in enumerate(matrix):
        for predicted, count in enumerate(row):
            axis.text(predicted, true, str(count), ha="center", va="center",
                      color="white" if count > peak / 2 else "black")
    axis.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title=f"confusion matrix: {name}")
    return _figure_html(figure, f"confusion matrix of {name}")


def _section_extras(run: dict) -> list[str]:
    parts = []
    if run.get("targets"):
        rows = "".join(
            f"<tr><td>{html.escape(t['name'])}</td><td>{html.escape(t['target'])}</td><td>{html.escape(t['measured'])}</td>"
            f"<td class='{'met' if t['met'] else 'unmet'}'>{'met' if t['met'] else 'not met'}</td></tr>"
            for t in run["targets"]
        )
        parts.append(f"<h3>Targets</h3><table><tr><th>target</th><th>goal</th><th>measured</th><th></th></tr>{rows}</table>")
    if run.get("stages"):
        cpu = run.get("stage_cpu_seconds") or {}
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td><td>{format_value('', cpu.get(k))}</td></tr>"
            for k, v in run["stages"].items()
        )
        parts.append("<h3>Time per stage</h3><table><tr><th>stage</th><th>wall</th><th>CPU seconds (all threads)</th>"
                     f"</tr>{rows}</table>")
    if run.get("setup"):
        items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in run["setup"].items())
        parts.append(f"<h3>Setup</h3><ul class='note'>{items}</ul>")
    return parts


def run_section(run: dict, source: str) -> str:
    title = html.escape(run.get("title") or source)
    parts = [f"<h2>{title}</h2>", f"<p class='note'>from <code>{html.escape(source)}</code>"
             f"{' — ' + html.escape(run['summary']) if run.get('summary') else ''}</p>"]
    parts.append(metrics_table(run))
    highlight = run.get("highlight") or next((n for n, e in run["models"].items() if e["role"] != "teacher"), None)
    for plot in (tradeoff_plot(run), curves_plot(run), confusion_plot(run, highlight) if highlight else None):
        if plot:
            parts.append(plot)
    parts += _section_extras(run)
    return "\n".join(parts)


def render_report(runs: list[tuple[str, dict]]) -> str:
    sections = "\n".join(run_section(run, source) for source, run in runs)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>alambic report</title>"
        f"<style>{STYLE}</style></head><body><h1>alambic distillation report</h1>{sections}</body></html>"
    )


def write_report(run_folders: list[str | Path], output: str | Path | None = None) -> Path:
    """Render the report for one or more run folders; by default into the first folder's report.html."""
    if not run_folders:
        raise AlambicError("no run folder given", "pass one or more run folders that hold a metrics.json")
    runs = [(str(folder), load_metrics(folder)) for folder in run_folders]
    first = Path(run_folders[0])
    target = Path(output) if output else (first if first.is_dir() else first.parent) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, render_report(runs))
    return target
