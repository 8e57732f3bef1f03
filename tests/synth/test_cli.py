from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from node.synth.cli import synth

app = typer.Typer()
app.command()(synth)


def test_cli_writes_studies_without_patient_data(tmp_path):
    result = CliRunner().invoke(
        app, ["mr", "--count", "2", "--out", str(tmp_path), "--seed", "4", "--slices", "3", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 mr studies (6 instances)" in result.output
    assert "SYNTH^" not in result.output and "SYN0" not in result.output
    index = json.loads((tmp_path / "mr-s4-index.json").read_text())
    assert len(index) == 2
    assert all((tmp_path / e["dir"] / "truth.json").exists() for e in index)


def test_cli_label_and_options_are_checked(tmp_path):
    runner = CliRunner()
    bad_option = runner.invoke(app, ["cxr", "--count", "1", "--out", str(tmp_path), "--slices", "3"])
    assert bad_option.exit_code != 0
    bad_label = runner.invoke(app, ["ct", "--count", "1", "--out", str(tmp_path), "--label", "tumour"])
    assert bad_label.exit_code != 0
    ok = runner.invoke(
        app,
        ["cxr", "-n", "1", "-o", str(tmp_path), "--label", "pneumonia", "--scale", "0.1", "--random-uids"],
    )
    assert ok.exit_code == 0, ok.output
    assert "pneumonia: 1" in ok.output
