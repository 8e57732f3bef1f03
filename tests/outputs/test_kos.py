"""Key Object Selection Documents over the output cases and real pydicom-data files: the key
images (frames named), their presentation states and the SR referenced, valid by dciodvfy,
DCMTK's dsrdump and PixelMed's DicomSRValidator (TID 2010); and the output switches of
build_outputs and the outbox (per destination: presentation_state, key_objects)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlmodel import Session, select

from node.outputs.gsps import build_presentation_states, marked_images
from node.outputs.kos import OF_INTEREST, build_key_object_selection
from node.outputs.sr import build_sr
from node.runner import build_outputs, outbox
from node.settings import DestinationSettings, Settings
from node.store.db import make_engine
from node.store.tables import OutboxItem, utcnow
from tests.helpers import add_job
from tests.outputs.conftest import Case
from tests.outputs.fabricate import IDENTITY, PNEUMONIA, PRIVATE_CODE, Spot, make_result, score
from tests.outputs.test_real_sources import REAL_FILES, our_errors, real, result_for
from tests.outputs.tools import SrValidation, dciodvfy, dsrdump, need_pixelmed, pixelmed_available

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Built:
    """A case's SR, presentation states and KOS, the KOS written to a file."""

    case: Case
    sr: Dataset
    states: list[Dataset]
    kos: Dataset
    path: Path


@pytest.fixture(scope="module")
def kos_built(
    cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Built], SrValidation | None]]:
    folder = tmp_path_factory.mktemp("kos")
    out = {}
    for name, case in cases.items():
        sr = build_sr(case.result, case.sources, IDENTITY)
        states = build_presentation_states(case.result, case.sources, IDENTITY)
        kos = build_key_object_selection(
            case.result, case.sources, IDENTITY, sr=sr, presentation_states=states
        )
        assert kos is not None, name
        path = folder / f"{name}-kos.dcm"
        kos.save_as(path, enforce_file_format=True)
        out[name] = Built(case, sr, states, kos, path)
    validation = SrValidation([b.path for b in out.values()]) if pixelmed_available() else None
    yield out, validation
    if validation is not None:
        validation.close()


@pytest.fixture(scope="module")
def kos(kos_built: tuple[dict[str, Built], SrValidation | None]) -> dict[str, Built]:
    return kos_built[0]


def items(kos: Dataset, value_type: str) -> list[Dataset]:
    return [item for item in kos.ContentSequence if item.ValueType == value_type]


def test_kos_flags_the_marked_images_and_references_sr_and_states(kos: dict[str, Built]) -> None:
    for name, b in kos.items():
        doc = b.kos
        assert doc.SOPClassUID == KOS_CLASS and doc.Modality == "KO"
        assert doc.StudyInstanceUID == b.case.result.study_uid
        assert doc.SeriesInstanceUID not in {b.sr.SeriesInstanceUID, *b.case.result.series_uids}
        title = doc.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == (OF_INTEREST.value, "DCM")
        marked = list(dict.fromkeys(m.image.sop_instance_uid for m in marked_images(b.case.result)))
        images = items(doc, "IMAGE")
        assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images] == marked, name
        states = {
            str(s.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID): s
            for s in b.states
        }
        for image in images:
            ref = image.ReferencedSOPSequence[0]
            assert "ConceptNameCodeSequence" not in image  # TID 2010 row 8: unnamed
            state = states[str(ref.ReferencedSOPInstanceUID)]
            assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == state.SOPInstanceUID
            assert ref.get("ReferencedFrameNumber") == (2 if name == "mf" else None)
        (composite,) = items(doc, "COMPOSITE")
        assert composite.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == b.sr.SOPInstanceUID
        (text,) = [i for i in items(doc, "TEXT") if i.ConceptNameCodeSequence[0].CodeValue == "113012"]
        assert "not for diagnosis" in text.TextValue.lower() and "p=" in text.TextValue
        evidence = {
            str(i.ReferencedSOPInstanceUID)
            for study in doc.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for i in series.ReferencedSOPSequence
        }
        assert evidence == {*marked, str(b.sr.SOPInstanceUID), *(str(s.SOPInstanceUID) for s in b.states)}


def test_kos_is_valid_by_dciodvfy_and_dsrdump(kos: dict[str, Built]) -> None:
    for name, b in kos.items():
        report = dciodvfy(b.path)
        assert not report.errors, f"{name}: {report.errors}"
        dump = dsrdump(b.path)
        assert dump.returncode == 0 and "Of Interest" in dump.stdout, dump.stderr
        assert not [line for line in dump.stderr.splitlines() if line.startswith("E:")], dump.stderr


def test_kos_passes_pixelmed_tid_2010(kos_built: tuple[dict[str, Built], SrValidation | None]) -> None:
    need_pixelmed()
    built, validation = kos_built
    assert validation is not None
    reports = validation.reports()
    for name, b in built.items():
        report = reports[str(b.path)]
        assert "Found Root Template TID_2010" in report.text, report.text
        assert not report.errors, f"{name}: {report.errors}"


def test_no_kos_without_a_positive_finding(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    negative = make_result(
        case.sources,
        [score("pneumonia", PNEUMONIA, 0.2), score("nodule", PRIVATE_CODE, 0.1)],
        [Spot(0, "pneumonia", 260, 200, 30)],
        seed="job-negative",
    )
    assert build_key_object_selection(negative, case.sources, IDENTITY) is None


@pytest.mark.parametrize("name", ["emri_small.dcm", "US1_UNCI.dcm", "RG1_J2KI.dcm"])
def test_real_file_kos_is_valid(name: str, tmp_path: Path) -> None:
    ds = real(name)
    result = result_for(ds, REAL_FILES[name])
    doc = build_key_object_selection(result, [ds], IDENTITY, sr=build_sr(result, [ds], IDENTITY))
    assert doc is not None
    path = tmp_path / "kos.dcm"
    doc.save_as(path, enforce_file_format=True)
    errors = our_errors(path, ds)
    assert not errors, "\n".join(errors)


# -- switches ------------------------------------------------------------------------------------


def _settings(*destinations: dict, **outputs: bool) -> Settings:
    dests = [
        DestinationSettings(name=f"d{i}", ae_title=f"D{i}", host="127.0.0.1", port=104 + i, **d)
        for i, d in enumerate(destinations)
    ]
    # no heatmap captures unless asked (they take most of the time and are not under test here)
    return Settings(destinations=dests, outputs={"send_to": "all", "secondary_capture": False, **outputs})


def _kinds(out: list[tuple[str, Dataset]]) -> list[str]:
    return [kind for kind, _ in out]


def test_build_outputs_writes_states_and_kos_behind_the_switches(cases: dict[str, Case]) -> None:
    case = cases["ct"]
    out = build_outputs(case.result, case.sources, IDENTITY, _settings({"parametric_map": False}))
    assert _kinds(out).count("gsps") == 2 and _kinds(out).count("kos") == 1
    by_kind = {kind: ds for kind, ds in out}
    kos = by_kind["kos"]
    nested = [i.ReferencedSOPSequence[0].get("ReferencedSOPSequence") for i in items(kos, "IMAGE")]
    assert all(nested)  # the only destination takes the states: the KOS names them
    assert (
        items(kos, "COMPOSITE")[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == by_kind["sr"].SOPInstanceUID
    )
    off = build_outputs(
        case.result, case.sources, IDENTITY, _settings({}, presentation_state=False, key_objects=False)
    )
    assert not {"gsps", "kos"} & set(_kinds(off))
    # no destination wants them: not built
    none = build_outputs(
        case.result, case.sources, IDENTITY, _settings({"presentation_state": False, "key_objects": False})
    )
    assert not {"gsps", "kos"} & set(_kinds(none))
    # a KOS destination without the states: the KOS does not point at states it will not have
    mixed = build_outputs(case.result, case.sources, IDENTITY, _settings({}, {"presentation_state": False}))
    kos = next(ds for kind, ds in mixed if kind == "kos")
    assert not any(i.ReferencedSOPSequence[0].get("ReferencedSOPSequence") for i in items(kos, "IMAGE"))
    negative = make_result(case.sources, [score("pneumonia", PNEUMONIA, 0.1)], [], seed="job-neg")
    assert not {"gsps", "kos"} & set(_kinds(build_outputs(negative, case.sources, IDENTITY, _settings({}))))


def test_outbox_sends_states_and_kos_only_where_wanted(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["dx"]
    settings = _settings({}, {"presentation_state": False}, {"key_objects": False, "parametric_map": False})
    out = build_outputs(case.result, case.sources, IDENTITY, settings)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    now = utcnow()
    with Session(engine) as s:
        job = add_job(
            s,
            key="m|image|1",
            level="image",
            study_uid=case.result.study_uid,
            series_uids=[case.result.series_uids[0]],
        )
        written = outbox.write_output_files(tmp_path / "outbox", job.id or 0, out)
        outbox.queue_outputs(s, job, written, settings.destinations, tmp_path, now)
        s.commit()
        rows = list(s.exec(select(OutboxItem)))
    sent = {d.name: {r.kind for r in rows if r.destination == d.name} for d in settings.destinations}
    assert sent["d0"] == {"sr", "gsps", "kos", "pm"}
    assert "gsps" not in sent["d1"] and "kos" in sent["d1"]
    assert "kos" not in sent["d2"] and "gsps" in sent["d2"] and "pm" not in sent["d2"]
