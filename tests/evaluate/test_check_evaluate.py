"""``pacs-node models check`` on the bundled models and ``pacs-node evaluate`` on a phantom set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.evaluate.dataset import DatasetError, collect_cases
from node.synth import generate_study

MODELS = Path(__file__).resolve().parents[2] / "models" / "onnx"
runner = CliRunner()


def test_models_check_bundled() -> None:
    result = runner.invoke(app, ["models", "check", "--models", str(MODELS), "--threads", "1"])
    assert result.exit_code == 0, result.output
    for model_id in ("cxr", "mammo", "ct-liver", "mr-brain", "ct-liver-seg"):
        assert f"[{model_id}] ok" in result.output
    assert "CPUExecutionProvider" in result.output and "latency" in result.output
    # the colour models are checked with a phantom of their own kind, three-channel input
    for model_id, kind in (("fundus-dr", "fundus"), ("derm-lesion", "derm"), ("smear-malaria", "smear")):
        block = result.output.split(f"[{model_id}] ")[1].split("\n[")[0]
        assert block.startswith("ok"), block
        assert f"phantom {kind}: 1 file(s); input image (1, 3, " in block, block
    total = len([d for d in MODELS.iterdir() if (d / "manifest.yaml").is_file()])
    assert f"{total} of {total} model(s) passed" in result.output


def test_models_check_fails_on_broken_model(tmp_path: Path) -> None:
    broken = tmp_path / "cxr"
    broken.mkdir()
    (broken / "manifest.yaml").write_text((MODELS / "cxr" / "manifest.yaml").read_text())
    (broken / "model.onnx").write_bytes(b"not onnx")
    result = runner.invoke(app, ["models", "check", "cxr", "--models", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAIL registry" in result.output and "sha256" in result.output


@pytest.fixture(scope="module")
def cxr_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small cxr phantoms (balanced over the label choices) with truth sidecars."""
    root = tmp_path_factory.mktemp("cxr-set")
    choices = [(), ("tuberculosis",), ("pneumonia",), ("tuberculosis", "pneumonia")]
    for i in range(16):
        generate_study(
            "cxr",
            root / f"s{i:02d}",
            9000 + i,
            choices[i % 4],
            write_masks=False,
            scale=0.15,
            patient_number=i % 3,
        )
    return root


def test_evaluate_phantom_set(cxr_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "cxr",
            str(cxr_set),
            "--models",
            str(MODELS),
            "--out",
            str(out),
            "--bootstrap",
            "200",
            "--threads",
            "1",
            "--group-by",
            "PatientID",
            "--examples",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())
    assert summary["cases"] == 16 and not summary["failed"]
    by_label = {f["label"]: f for f in summary["findings"]}
    tb = by_label["tuberculosis"]
    assert tb["positives"] == 8 and tb["negatives"] == 8
    assert sum(tb["confusion"].values()) == 16
    assert tb["metrics"]["auc"] > 0.9  # the reference model separates its phantoms
    lo, hi = tb["ci95"]["accuracy"]
    assert lo <= tb["metrics"]["accuracy"] <= hi
    assert tb["operating_point"]["sensitivity"] >= 0.9
    assert len(summary["groups"]) == 3
    page = (out / "report.html").read_text()
    assert "<svg" in page and "data:image/png;base64," in page and "TP " in page
    assert "research use only" in page


def test_evaluate_with_csv_labels(cxr_set: Path, tmp_path: Path) -> None:
    import json as _json

    rows = []
    for study in sorted(cxr_set.iterdir()):
        truth = _json.loads((study / "truth.json").read_text())
        rows.append(
            {
                "study_instance_uid": truth["study_instance_uid"],
                "tuberculosis": int("tuberculosis" in truth["labels"]),
                "pneumonia": int("pneumonia" in truth["labels"]),
                "site": "A" if len(rows) % 2 else "B",
            }
        )
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cases = collect_cases(cxr_set, "image", ["tuberculosis", "pneumonia"], labels_csv=labels, group_by="site")
    assert len(cases) == 16 and {c.group for c in cases} == {"A", "B"}
    assert sum("pneumonia" in c.labels for c in cases) == 8
    # an unlabelled case is an error naming it
    with labels.open("w") as f:
        f.write("study_instance_uid,labels\n1.2.3,pneumonia\n")
    with pytest.raises(DatasetError, match="have no label"):
        collect_cases(cxr_set, "image", ["tuberculosis", "pneumonia"], labels_csv=labels)


def test_node_does_not_import_converters() -> None:
    import subprocess
    import sys

    code = "import sys, node.cli, node.app; print(any(m.split('.')[0] == 'converters' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
