"""Helpers of the monitoring tests: phantom populations (optionally shifted), a models folder
with copies of the reference cxr model, waiting for model runs, scraping gauges, and asking
promtool whether the drift alerts fire on scraped values."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, func, select

from node.store.tables import ModelRun
from node.synth import generate_study
from tests.helpers import REPO, need

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"


def phantoms(
    folder: Path, seeds: range, intensity: float = 1.0, manufacturer: str | None = None
) -> list[Path]:
    """One small chest radiograph phantom study per seed (truth.json beside each); ``intensity``
    scales the stored values (the header's window kept, as a detector with another gain would
    send), ``manufacturer`` replaces the Manufacturer."""
    files = []
    for seed in seeds:
        study = folder / f"s{seed}"
        generate_study("cxr", study, seed=seed, scale=0.25, write_masks=False)
        for path in sorted(study.glob("*.dcm")):
            if intensity != 1.0 or manufacturer is not None:
                ds = pydicom.dcmread(path)
                if intensity != 1.0:
                    arr = ds.pixel_array
                    top = 2 ** int(ds.BitsStored) - 1
                    ds.PixelData = np.clip(np.rint(arr * intensity), 0, top).astype(arr.dtype).tobytes()
                if manufacturer is not None:
                    ds.Manufacturer = manufacturer
                ds.save_as(path)
            files.append(path)
    return files


def model_copy(models: Path, model_id: str = "cxr", **changes: object) -> Path:
    """A copy of the reference model ``cxr`` under ``models/<model_id>``, with top-level manifest
    fields changed (``mode="shadow"``) and label thresholds set (``thresholds={label: t}``)."""
    target = models / model_id
    shutil.copytree(REPO / "models" / "onnx" / "cxr", target)
    manifest = yaml.safe_load((target / "manifest.yaml").read_text())
    manifest["id"] = model_id
    for label in manifest["labels"]:
        label["threshold"] = changes.get("thresholds", {}).get(label["name"], label["threshold"])  # type: ignore[union-attr]
    manifest.update({k: v for k, v in changes.items() if k != "thresholds"})
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target


def wait_runs(engine, n: int, timeout: float = 600.0) -> None:  # noqa: ANN001 - a SQLAlchemy Engine
    """Wait until ``n`` model runs are recorded."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        with Session(engine) as s:
            count = s.exec(select(func.count()).select_from(ModelRun)).one()
        if count >= n:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{count} of {n} model runs recorded")


def gauges(text: str, *names: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of the named metric families of a /metrics text: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name in names
        for s in family.samples
    }


def _render(template: str, labels: dict[str, str], value: float) -> str:
    """The two template forms the drift alerts use: {{ $labels.x }} and {{ $value | printf "%.2f" }}."""
    text = re.sub(r'\{\{ \$value \| printf "%\.2f" \}\}', f"{value:.2f}", template)
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)


def promtool_drift_test(samples: dict, folder: Path, instance: str = "node") -> subprocess.CompletedProcess:
    """Run `promtool test rules` on the drift alerts with each scraped gauge held at its value
    for 100 minutes; expected: an alert for exactly the gauges above 0.25 (with its annotations),
    silence for the others. Returns promtool's run (returncode 0: the rules did exactly that)."""
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    metric_alert = {
        "pacsnode_model_score_psi": "PacsNodeModelScoreDrift",
        "pacsnode_model_input_drift": "PacsNodeModelInputDrift",
    }
    series, expected = [], {a: [] for a in metric_alert.values()}
    for (name, labels), value in samples.items():
        if name not in metric_alert:
            continue
        full = {"instance": instance, **dict(labels)}
        selector = ",".join(f'{k}="{v}"' for k, v in sorted(full.items()))
        series.append({"series": f"{name}{{{selector}}}", "values": f"{value!r}x20"})
        if value > 0.25:
            alert = metric_alert[name]
            rule = rules[alert]
            expected[alert].append(
                {
                    "exp_labels": {**full, **rule["labels"]},
                    "exp_annotations": {k: _render(t, full, value) for k, t in rule["annotations"].items()},
                }
            )
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "5m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "90m", "alertname": alert, "exp_alerts": alerts}
                    for alert, alerts in expected.items()
                ],
            }
        ],
    }
    path = folder / "drift_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run(
        [need("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
