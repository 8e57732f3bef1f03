"""Done-when of issue 18 (drift): a model's validation reference is written by `pacs-node evaluate
--write-reference`; one node is fed phantoms like the validation data, another the same kind of
phantoms at half the intensity scale, both over C-STORE through the whole node. /metrics of the
shifted node shows input and score drift above 0.25 and promtool says the drift alerts fire on
the scraped values; the unshifted node's gauges stay below and the alerts stay silent."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from node.cli import app
from node.inference.registry import load_model
from tests.helpers import raw_store_file
from tests.monitoring.common import gauges, model_copy, phantoms, promtool_drift_test, wait_runs

pytestmark = pytest.mark.slow

REFERENCE_CASES = 150
STREAM = 80


def _stream(make_node, folder: Path, models: Path, files: list[Path]) -> dict:  # noqa: ANN001
    folder.mkdir(parents=True)
    node = make_node(folder, models={"directory": str(models), "providers": ["CPUExecutionProvider"]})
    for path in files:
        assert raw_store_file(node.scp.port, path) == 0
    wait_runs(node.engine, len(files))
    text = TestClient(node.web_app()).get("/metrics").text
    return gauges(
        text,
        "pacsnode_model_score_psi",
        "pacsnode_model_score_ks",
        "pacsnode_model_input_drift",
        "pacsnode_model_runs",
    )


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder whose cxr carries the reference of REFERENCE_CASES phantoms."""
    root = tmp_path_factory.mktemp("drift")
    models = root / "models"
    model_copy(models)
    phantoms(root / "validation", range(1000, 1000 + REFERENCE_CASES))
    run = CliRunner().invoke(
        app,
        [
            "evaluate",
            "cxr",
            str(root / "validation"),
            "--models",
            str(models),
            "-o",
            str(root / "eval"),
            "--bootstrap",
            "0",
            "--examples",
            "0",
            "--write-reference",
        ],
    )
    assert run.exit_code == 0, run.output
    assert "wrote the validation reference" in run.output
    return models


def test_reference_is_kept_in_the_manifest(reference_model: Path) -> None:
    manifest = load_model(reference_model / "cxr").manifest
    ref = manifest.reference
    assert ref is not None and ref.cases == REFERENCE_CASES
    assert set(ref.scores) == {"tuberculosis", "pneumonia"}
    for label in ref.scores.values():
        assert len(label.quantiles) == 101 and sum(label.counts) == REFERENCE_CASES
    assert set(ref.inputs) == {"rows", "columns", "pixel_spacing_mm", "p1", "p50", "p99"}
    assert ref.manufacturers == {"pacs-node synth": REFERENCE_CASES}


def test_shifted_population_fires_the_drift_alerts(make_node, reference_model: Path, tmp_path: Path) -> None:  # noqa: ANN001
    same = _stream(
        make_node, tmp_path / "same", reference_model, phantoms(tmp_path / "p1", range(2000, 2000 + STREAM))
    )
    shifted = _stream(
        make_node,
        tmp_path / "shifted",
        reference_model,
        phantoms(tmp_path / "p2", range(3000, 3000 + STREAM), 0.5),
    )
    runs = ("pacsnode_model_runs", (("mode", "active"), ("model", "cxr"), ("version", "1.0.0")))
    assert same[runs] == shifted[runs] == STREAM
    p50 = ("pacsnode_model_input_drift", (("mode", "active"), ("model", "cxr"), ("statistic", "p50")))
    assert same[p50] < 0.25 < shifted[p50]
    for label in ("tuberculosis", "pneumonia"):  # the darker images move the scores too
        psi = ("pacsnode_model_score_psi", (("label", label), ("mode", "active"), ("model", "cxr")))
        assert same[psi] < 0.25 < shifted[psi]
    drift_values = [
        v
        for (name, _), v in same.items()
        if name in ("pacsnode_model_score_psi", "pacsnode_model_input_drift")
    ]
    assert drift_values and max(drift_values) < 0.25, same
    quiet = promtool_drift_test(same, tmp_path / "same")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    fired = promtool_drift_test(shifted, tmp_path / "shifted")
    assert fired.returncode == 0, fired.stdout + fired.stderr
