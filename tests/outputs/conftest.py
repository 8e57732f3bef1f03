"""Sources and fabricated results for the output writers: pydicom's CT_small, MR_small and a
2-frame secondary capture, and node.synth DX/MG phantoms. Every output is built once per session
and written under a temporary folder; PixelMed's SR validator starts on the SRs at once, in the
background, and the SR tests collect its reports."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import MultiFrameTrueColorSecondaryCaptureImageStorage, generate_uid

from node.outputs.pm import build_parametric_maps
from node.outputs.sc import build_heatmap_scs
from node.outputs.sr import build_sr
from node.types import AnalysisResult
from tests.outputs.fabricate import IDENTITY, MALIGNANT, PNEUMONIA, PRIVATE_CODE, Spot, make_result, score
from tests.outputs.tools import Report, SrValidation, need_pixelmed, pixelmed_available

#: Every case, in the order they are built.
CASES = ("ct", "mr", "dx", "mg", "mf")


@dataclass
class Case:
    """One source set, its fabricated result and every output built from it."""

    name: str
    sources: list[Dataset]
    result: AnalysisResult
    sr: Dataset | None = None
    scs: list[Dataset] = field(default_factory=list)
    pms: list[Dataset] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # "sr", "sc0", "pm0", ... -> file

    @property
    def by_uid(self) -> dict[str, Dataset]:
        """Sources by SOP Instance UID."""
        return {str(ds.SOPInstanceUID): ds for ds in self.sources}

    def build(self, folder: Path) -> Case:
        """Build every output and write it as a Part 10 file under ``folder``."""
        self.sr = build_sr(self.result, self.sources, IDENTITY)
        self.scs = build_heatmap_scs(self.result, self.by_uid, IDENTITY)
        self.pms = build_parametric_maps(self.result, self.sources, IDENTITY)
        folder.mkdir(parents=True, exist_ok=True)
        objects = {"sr": self.sr} | {f"sc{i}": d for i, d in enumerate(self.scs)}
        objects |= {f"pm{i}": d for i, d in enumerate(self.pms)}
        for key, ds in objects.items():
            path = folder / f"{self.name}-{key}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.files[key] = path
        return self

    def written(self, kind: str) -> list[Path]:
        """The files of one kind ("sr", "sc", "pm")."""
        return [path for key, path in self.files.items() if key.rstrip("0123456789") == kind]


def bundled(name: str) -> Dataset:
    """A test file bundled with pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not bundled with pydicom"
    return pydicom.dcmread(path)


def ct_slices() -> list[Dataset]:
    """CT_small as two slices of one series (fresh SOP Instance UIDs, second one 5 mm lower)."""
    first = bundled("CT_small.dcm")
    out = []
    for i in range(2):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["outputs-test ct", str(i)])
        ds.InstanceNumber = i + 1
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] - 5.0 * i]
        out.append(ds)
    return out


def synth_sources(kind: str, folder: Path, seed: int, label: str, **options: object) -> list[Dataset]:
    """A node.synth phantom study, read back."""
    from node.synth import generate_study

    truth = generate_study(kind, folder, seed, label, write_masks=False, **options)
    return [pydicom.dcmread(folder / inst.file) for inst in truth.instances]


def make_cases(folder: Path) -> dict[str, Case]:
    """The source sets and fabricated results of every case (outputs not built yet)."""
    cases: dict[str, Case] = {}
    # CT (real file, private + standard codes); the nodule is strongest on slice 2
    ct = ct_slices()
    cases["ct"] = Case(
        "ct",
        ct,
        make_result(
            ct,
            [score("nodule", PRIVATE_CODE, 0.87), score("pneumonia", PNEUMONIA, 0.12)],
            [Spot(0, "nodule", 40, 70, 6, 0.6), Spot(1, "nodule", 80, 50, 8, 1.0)],
        ),
    )
    mr = [bundled("MR_small.dcm")]
    cases["mr"] = Case(
        "mr",
        mr,
        make_result(
            mr,
            [score("nodule", PRIVATE_CODE, 0.61), score("pneumonia", PNEUMONIA, 0.08)],
            [Spot(0, "nodule", 30, 20, 4)],
            seed="job-mr",
            method="cam",
        ),
    )
    dx = synth_sources("cxr", folder / "dx", 3, "pneumonia", modality="DX", scale=0.25)
    cases["dx"] = Case(
        "dx",
        dx,
        make_result(
            dx,
            [score("pneumonia", PNEUMONIA, 0.91), score("nodule", PRIVATE_CODE, 0.2)],
            [Spot(0, "pneumonia", 260, 200, 30)],
            seed="job-dx",
        ),
    )
    mg = synth_sources("mammo", folder / "mg", 4, "malignant", rows=1400, cols=1100)
    cases["mg"] = Case(
        "mg",
        mg,
        make_result(
            mg,
            [score("malignant", MALIGNANT, 0.77, threshold=0.4)],
            [Spot(1, "malignant", 850, 830, 60)],
            seed="job-mg",
            method="occlusion",
        ),
    )
    # a multi-frame source: pydicom's 2-frame RLE secondary capture, as the multi-frame true colour
    # SC it is (its file names the single-frame SC class); the finding is on frame 2
    mf = [bundled("SC_rgb_rle_2frame.dcm")]
    mf[0].SOPClassUID = MultiFrameTrueColorSecondaryCaptureImageStorage
    cases["mf"] = Case(
        "mf",
        mf,
        make_result(
            mf,
            [score("nodule", PRIVATE_CODE, 0.7)],
            [Spot(0, "nodule", 60, 30, 6)],
            seed="job-mf",
            frames=[2],
        ),
    )
    return cases


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Case], SrValidation | None]]:
    """Every case with its outputs built and written, and PixelMed's validator started on the SRs."""
    folder = tmp_path_factory.mktemp("outputs")
    cases = {name: case.build(folder / "out") for name, case in make_cases(folder).items()}
    validation = SrValidation([c.files["sr"] for c in cases.values()]) if pixelmed_available() else None
    yield cases, validation
    if validation is not None:
        validation.close()


@pytest.fixture(scope="session")
def cases(built: tuple[dict[str, Case], SrValidation | None]) -> dict[str, Case]:
    """Every case, outputs built and written once per session."""
    return built[0]


@pytest.fixture(scope="session")
def sr_reports(built: tuple[dict[str, Case], SrValidation | None]) -> dict[str, Report]:
    """PixelMed's DicomSRValidator report of each case's SR, by case name."""
    need_pixelmed()
    cases, validation = built
    assert validation is not None
    reports = validation.reports()
    return {name: reports[str(case.files["sr"])] for name, case in cases.items()}
