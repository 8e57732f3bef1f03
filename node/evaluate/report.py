"""Write an evaluation as a self-contained HTML page (inline SVG ROC curves and PNG heatmaps) and JSON."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.evaluate.classification import METRIC_NAMES
from node.evaluate.run import Example

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}
th{background:#eee}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em}
.cm td{width:5em;text-align:center}figure{display:inline-block;margin:.5em}figcaption{font-size:.85em}"""

_LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1",
    "auc": "ROC AUC",
}


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def roc_svg(fpr: Sequence[float | None], tpr: Sequence[float | None], title: str, size: int = 260) -> str:
    """An inline SVG ROC curve (with the chance diagonal)."""
    pad = 30
    inner = size - 2 * pad
    points = [
        (pad + x * inner, size - pad - y * inner)
        for x, y in zip(fpr, tpr, strict=True)
        if x is not None and y is not None
    ]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">'
        f"<title>{html.escape(title)}</title>"
        f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#999"/>'
        f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" '
        'stroke="#ccc" stroke-dasharray="4"/>'
        f'<polyline points="{path}" fill="none" stroke="#c0392b" stroke-width="2"/>'
        f'<text x="{size / 2}" y="{size - 6}" font-size="11" text-anchor="middle">1 - specificity</text>'
        f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 10 {size / 2})">sensitivity</text>'
        f'<text x="{size / 2}" y="18" font-size="12" text-anchor="middle">{html.escape(title)}</text></svg>'
    )


def _finding_section(f: dict[str, Any]) -> str:
    cm = f["confusion"]
    rows = "".join(
        f"<tr><th>{_LABELS[name]}</th><td>{_num(f['metrics'][name])}</td>"
        f"<td>{_num(f['ci95'][name][0])} – {_num(f['ci95'][name][1])}</td></tr>"
        for name in METRIC_NAMES
    )
    op = f.get("operating_point")
    op_text = ""
    if op:
        op_text = (
            f"<p>Threshold reaching sensitivity {op['target_sensitivity']:.2f}: <b>{op['threshold']:.4f}</b> "
            f"(sensitivity {_num(op['sensitivity'])}, specificity {_num(op['specificity'])}).</p>"
        )
    version = f" ({html.escape(f['model_version'])})" if f.get("model_version") else ""
    threshold = "n/a" if f["threshold"] is None else f"{f['threshold']:.4f}"
    kind = "threshold in force" if f.get("model_version") else "manifest threshold"  # feedback: as recorded
    return f"""<h2>{html.escape(f["label"])}{version}</h2>
<p>{f["cases"]} cases: {f["positives"]} positive, {f["negatives"]} negative; {kind}
{threshold}.</p>
<div style="display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start">
<table><tr><th>metric</th><th>value</th><th>95% CI (bootstrap)</th></tr>{rows}</table>
<table class="cm"><tr><th></th><th>truth +</th><th>truth −</th></tr>
<tr><th>called +</th><td>TP {cm["tp"]}</td><td>FP {cm["fp"]}</td></tr>
<tr><th>called −</th><td>FN {cm["fn"]}</td><td>TN {cm["tn"]}</td></tr></table>
{roc_svg(f["roc"]["fpr"], f["roc"]["tpr"], f"ROC {f['label']} (AUC {_num(f['metrics']['auc'])})")}
</div>{op_text}"""


def _group_section(groups: dict[str, list[dict[str, Any]]]) -> str:
    head = (
        "<tr><th>group</th><th>finding</th><th>pos/neg</th>"
        + "".join(f"<th>{_LABELS[n]}</th>" for n in METRIC_NAMES)
        + "</tr>"
    )
    rows = ""
    for name, findings in groups.items():
        for f in findings:
            rows += (
                f"<tr><td>{html.escape(name)}</td><td>{html.escape(f['label'])}</td>"
                f"<td>{f['positives']}/{f['negatives']}</td>"
                + "".join(f"<td>{_num(f['metrics'][n])}</td>" for n in METRIC_NAMES)
                + "</tr>"
            )
    return f"<h2>Per group</h2><table>{head}{rows}</table>"


def _segmentation_section(seg: dict[str, Any] | None, label_map: dict[str, str] | None) -> str:
    """Dice against the truth masks per label (segmentation models)."""
    if seg is None:
        return (
            "<h2>Segmentation</h2><p>No case had truth masks (phantoms written with masks, "
            "<code>pacs-node synth --masks</code>), so no Dice.</p>"
        )
    head = (
        "<tr><th>label</th><th>studies with truth</th><th>mean Dice per study</th><th>lowest</th>"
        "<th>pooled Dice</th><th>false-positive studies</th><th>predicted / truth voxels</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td>{r['studies']}</td><td>{_num(r['mean_dice'])}</td>"
        f"<td>{_num(r['min_dice'])}</td><td>{_num(r['pooled_dice'])}</td>"
        f"<td>{r['false_positive_studies']}</td><td>{r['predicted_voxels']} / {r['truth_voxels']}</td></tr>"
        for r in seg["labels"]
    )
    mapping = ""
    if label_map:
        pairs = ", ".join(f"{html.escape(k)} → {html.escape(v)}" for k, v in label_map.items())
        mapping = f" Truth labels mapped to the model's: {pairs}."
    return (
        f"<h2>Segmentation: Dice against the truth masks</h2><p>{seg['cases_with_masks']} cases with truth "
        "masks; the node's masks in source pixels over every analysed frame. Mean Dice: over the studies "
        "whose truth has the label; pooled: every voxel of every study; <i>lesion</i>: any label vs "
        f"background.{mapping}</p><table>{head}{rows}</table>"
    )


def _feedback_section(summary: dict[str, Any]) -> str:
    """``--labels feedback``: what the reference is, and the agreement figures per finding."""
    head = (
        "<tr><th>finding</th><th>version</th><th>ratings</th><th>agree</th><th>disagree</th><th>unsure</th>"
        "<th>agreement rate</th><th>PPV</th><th>NPV</th><th>sensitivity</th><th>specificity</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(a['label'])}</td><td>{html.escape(a['model_version'])}</td><td>{a['ratings']}</td>"
        f"<td>{a['agree']}</td><td>{a['disagree']}</td><td>{a['unsure']}</td><td>{_num(a['agreement_rate'])}</td>"
        f"<td>{_num(a['ppv'])}</td><td>{_num(a['npv'])}</td><td>{_num(a['sensitivity'])}</td>"
        f"<td>{_num(a['specificity'])}</td></tr>"
        for a in summary["agreement"]
    )
    shown = ", ".join(f"{k} {html.escape(str(v))}" for k, v in (summary.get("filters") or {}).items() if v)
    return f"""<p>Reference labels: the radiologists' feedback stored by the node ({summary["cases"]} rated
verdicts{f"; {shown}" if shown else ""}): <i>agree</i> keeps the model's decision, <i>disagree</i> takes the
correct label, {summary["excluded_unsure"]} <i>unsure</i> verdicts are left out. Scores and decisions are the
ones the node recorded for each job; each verdict is one case. Intervals: percentile bootstrap over verdicts
({summary["bootstrap"]["resamples"]} resamples).</p>
<h2>Agreement with the feedback</h2><table>{head}{rows}</table>"""


def render_html(summary: dict[str, Any], examples: Sequence[Example]) -> str:
    """The whole report page."""
    m = summary["model"]
    warn = (
        '<p class="warn">This model is marked research use only, not for diagnosis.</p>'
        if m.get("research_use_only")
        else ""
    )
    failed = summary.get("failed") or []
    failed_text = (
        "<h2>Failed cases</h2><ul>"
        + "".join(f"<li>{html.escape(x['case'])}: {html.escape(str(x['error']))}</li>" for x in failed)
        + "</ul>"
        if failed
        else ""
    )
    extra = ""
    if summary.get("class_accuracy") is not None:
        extra = f"<p>Decision accuracy over the classes: {_num(summary['class_accuracy'])}.</p>"
    segmentation = (
        _segmentation_section(summary["segmentation"], summary.get("label_map"))
        if "segmentation" in summary
        else ""
    )
    figures = "".join(
        f'<figure><img alt="heatmap" src="data:image/png;base64,{ex.png_base64}">'
        f"<figcaption>{html.escape(ex.label)} p={ex.probability:.3f} "
        f"({'true' if ex.truth else 'absent'}) — {html.escape(ex.case[-24:])}</figcaption></figure>"
        for ex in examples
        if ex.png_base64
    )
    intro = (
        _feedback_section(summary)
        if summary.get("source") == "feedback"
        else f"""<p>{summary["cases"]} cases at {summary["level"]} level, analysed by the node's decode →
preprocess → infer → aggregate path in {summary["seconds"]:.1f} s. Model sha256 <code>{m["sha256"]}</code>.
Intervals: percentile bootstrap over cases ({summary["bootstrap"]["resamples"]} resamples).</p>"""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Evaluation of {html.escape(m["id"])} {html.escape(m["version"])}</title>
<style>{_CSS}</style></head><body>
<h1>Evaluation: {html.escape(m["name"])}
(<code>{html.escape(m["id"])}</code> {html.escape(m["version"])})</h1>
{warn}
{intro}
{extra}
{segmentation}
{"".join(_finding_section(f) for f in summary["findings"])}
{_group_section(summary["groups"]) if summary.get("groups") else ""}
{"<h2>Example heatmaps</h2>" + figures if figures else ""}
{failed_text}
</body></html>
"""


def write_report(summary: dict[str, Any], examples: Sequence[Example], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    html_path.write_text(render_html(summary, examples), encoding="utf-8")
    json_path.write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    return html_path, json_path
