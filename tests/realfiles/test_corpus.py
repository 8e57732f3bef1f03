"""The real-file corpus through the whole node: each real vendor file (and each quirk variant
derived from one) is sent with DCMTK ``dcmsend`` (which proposes each file's own transfer syntax),
filed, routed, analysed by the reference models on CPU, and its outputs delivered to a DCMTK
``storescp``. Each case must end as its table entry says (:mod:`tests.realfiles.corpus`): the right
model and a finished job with SR + heatmap SC, or a stated reason and no result, or a permanent
failure after one attempt whose message says what is wrong. Every output must have no dciodvfy
error that the node caused (errors about attributes the source itself gets wrong are the source's).

Set ``PACS_NODE_CORPUS_TABLE=path.md`` to write the outcome table (file -> stored -> route/reason ->
job -> outputs -> dciodvfy errors) for a closing note.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, OutboxItem, OutboxState, Series
from tests.helpers import StoreSCP, analysing_config, free_port, need
from tests.outputs.tools import dciodvfy
from tests.realfiles.corpus import Case, cases

pytestmark = pytest.mark.slow
CASES = cases()
_ELEMENT = re.compile(r"(?:Element=<|</?)([A-Za-z0-9]+)>")


@dataclass
class Outcome:
    """What became of one case."""

    case: Case
    path: Path
    stored: bool = False
    send_log: str = ""
    series: Series | None = None
    jobs: list[Job] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    node_errors: dict[str, list[str]] = field(default_factory=dict)

    def route(self) -> str:
        if self.series is None:
            return "-"
        if self.series.state == "not routed":
            note = self.series.route_note
            # the deciding evidence comes last (e.g. the body region from the pixels)
            return note if len(note) <= 240 else f"{note[:90]} … {note[-150:]}"
        return f"{self.series.route_models} ({self.series.route_rule})"

    def job(self) -> str:
        if not self.jobs:
            return "-"
        return "; ".join(
            f"{j.state}" + (f" after {j.attempts}: {j.error}" if j.state == JobState.FAILED else "")
            for j in self.jobs
        )

    def kinds(self) -> list[str]:
        return [output_kind(p) for p in self.outputs]

    def output_kinds(self) -> str:
        kinds = self.kinds()
        return ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))) or "-"


def output_kind(path: Path) -> str:
    """SR, SC (secondary capture), PM (parametric map) or the SOP class name."""
    name = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID.name
    if "SR" in name:
        return "SR"
    if "Secondary Capture" in name:
        return "SC"
    if "Parametric Map" in name:
        return "PM"
    return name


def _attributes(lines: list[str]) -> set[str]:
    found: set[str] = set()
    for line in lines:
        found.update(_ELEMENT.findall(line))
    return found


def node_caused(output: Path, source: Path) -> list[str]:
    """dciodvfy errors of ``output`` except those about an attribute the source also gets wrong
    (a value copied from the source that is invalid there is the source's error, e.g. a patient
    module attribute a vendor left out)."""
    source_bad = _attributes(dciodvfy(source).errors)
    return [e for e in dciodvfy(output).errors if not (_attributes([e]) & source_bad)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Outcome]:
    need("dcmsend")
    folder = tmp_path_factory.mktemp("corpus")
    made = folder / "sent"
    made.mkdir()
    outcomes = {c.name: Outcome(c, c.make(made)) for c in CASES}
    dest_port = free_port()
    dest = StoreSCP(folder / "received", dest_port)
    config = analysing_config(
        folder,
        dest_port,
        destination={"parametric_map": True, "backoff_initial_s": 0.5, "backoff_max_s": 1.0},
        runner={"workers": 2, "max_attempts": 3, "retry_backoff_s": 0.5},
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        for outcome in outcomes.values():
            proc = subprocess.run(
                [
                    need("dcmsend"),
                    "-aec",
                    "PACSNODE",
                    "-aet",
                    "MODALITY",
                    "127.0.0.1",
                    str(node.scp.port),
                    str(outcome.path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            outcome.stored = proc.returncode == 0
            outcome.send_log = (proc.stdout + proc.stderr).strip()[-400:]
        _wait_until_settled(node, outcomes, timeout=900)
        received = {}
        for path in sorted((folder / "received").iterdir()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            received.setdefault(str(ds.StudyInstanceUID), []).append(path)
        for outcome in outcomes.values():
            study = str(pydicom.dcmread(outcome.path, stop_before_pixels=True).StudyInstanceUID)
            outcome.outputs = received.get(study, [])
            for path in outcome.outputs:
                errors = node_caused(path, outcome.path)
                if errors:
                    outcome.node_errors[path.name] = errors
    finally:
        node.stop()
        dest.stop()
    table = os.environ.get("PACS_NODE_CORPUS_TABLE")
    if table:
        Path(table).write_text(markdown_table(outcomes.values()))
    return outcomes


def _wait_until_settled(node, outcomes: dict[str, Outcome], timeout: float) -> None:
    """Until every stored case's series is not routed, or routed with every job done/failed and
    its outputs sent (or parked)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        with Session(node.engine, expire_on_commit=False) as s:
            for outcome in outcomes.values():
                if not outcome.stored:
                    continue
                series_uid = str(pydicom.dcmread(outcome.path, stop_before_pixels=True).SeriesInstanceUID)
                series = s.get(Series, series_uid)
                outcome.series = series
                if series is None or series.state not in ("routed", "not routed"):
                    pending.append(outcome.case.name)
                    continue
                if series.state == "not routed":
                    continue
                jobs = [j for j in s.exec(select(Job).where(Job.study_uid == series.study_uid))]
                outcome.jobs = jobs
                if not jobs or any(j.state not in (JobState.DONE, JobState.FAILED) for j in jobs):
                    pending.append(outcome.case.name)
                    continue
                ids = [j.id for j in jobs]
                items = [i for i in s.exec(select(OutboxItem)) if i.job_id in ids]
                if any(i.state == OutboxState.PENDING for i in items):
                    pending.append(outcome.case.name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cases not settled after {timeout} s: {pending}")
        time.sleep(0.5)


def markdown_table(outcomes) -> str:
    """The outcome table for a closing note."""
    lines = [
        "| file | stored | route / reason | job | outputs | dciodvfy errors (node) |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        errors = sum(len(v) for v in o.node_errors.values())
        cells = [
            o.case.name,
            "yes" if o.stored else "refused",
            o.route(),
            o.job(),
            o.output_kinds(),
            str(errors),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:260] for c in cells) + " |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_real_file_outcome(corpus: dict[str, Outcome], name: str) -> None:
    outcome = corpus[name]
    kind, detail = outcome.case.expect
    where = f"{name}: route {outcome.route()!r}, job {outcome.job()!r}, send {outcome.send_log!r}"
    if kind == "refused":
        assert not outcome.stored, where
        return
    assert outcome.stored, where
    assert outcome.series is not None, where
    if kind == "not routed or model" and outcome.series.state == "not routed":
        kind = "not routed"
    if kind == "not routed":
        assert outcome.series.state == "not routed", where
        assert outcome.series.route_note.startswith("not routed"), where
        assert detail.lower() in outcome.series.route_note.lower(), where
        assert not outcome.jobs and not outcome.outputs, where
        return
    assert outcome.series.state == "routed", where
    models = {j.model_id for j in outcome.jobs}
    assert models == {detail} or kind == "failed", where
    if kind == "failed":
        assert all(j.state == JobState.FAILED for j in outcome.jobs), where
        assert all(j.attempts == 1 for j in outcome.jobs), f"a data error was retried: {where}"
        assert all(detail.lower() in j.error.lower() for j in outcome.jobs), where
        return
    assert all(j.state == JobState.DONE for j in outcome.jobs), where
    kinds = outcome.kinds()
    assert "SR" in kinds, f"no SR came back: {where}"
    assert "SC" in kinds, f"no heatmap capture came back: {where}"
    for job in outcome.jobs:
        result = job.recorded_result()
        assert result is not None, where
        analysed = result.frames if result.frames is not None else (result.images or 0)
        assert analysed >= outcome.case.frames, (
            f"{analysed} of {outcome.case.frames} frames analysed: {where}"
        )


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_outputs_have_no_node_caused_dciodvfy_errors(corpus: dict[str, Outcome], name: str) -> None:
    outcome = corpus[name]
    assert not outcome.node_errors, f"{name}: {json.dumps(outcome.node_errors, indent=1)}"
