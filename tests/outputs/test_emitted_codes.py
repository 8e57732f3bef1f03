"""Every coded concept the output writers emit (SR, heatmap SC, parametric map, GSPS/CSPS, KOS,
SEG), by where it stands, from fixed inputs, against ``emitted_codes.json``: recorded from the
writers as they were when their codes were typed by hand, kept equal when pydicom's ``codes``
replaced them, so that a change of a code value, scheme or meaning shows up here on purpose.

Re-record (only when a code is meant to change): ``.venv/bin/python -m tests.outputs.test_emitted_codes``."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.outputs.gsps import build_presentation_states
from node.outputs.kos import build_key_object_selection
from node.outputs.sc import build_heatmap_scs
from node.outputs.seg import build_seg
from node.outputs.sr import build_sr
from tests.colour import colour_dataset
from tests.outputs.conftest import Case, make_cases
from tests.outputs.fabricate import IDENTITY
from tests.outputs.test_colour_outputs import colour_result
from tests.outputs.test_seg import phantom_result

GOLDEN = Path(__file__).with_name("emitted_codes.json")


def _codes(ds: Dataset, where: str, out: Counter[str]) -> None:
    """Count every code item below ``ds`` as 'output>Sequence>...: value|scheme|meaning'."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        path = f"{where}>{elem.keyword or elem.tag}"
        for item in elem.value if isinstance(elem.value, Sequence) else ():
            value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
            if value is not None and "CodingSchemeDesignator" in item:
                out[f"{path}: {value}|{item.CodingSchemeDesignator}|{item.get('CodeMeaning', '')}"] += 1
            _codes(item, path, out)


def emitted() -> dict[str, dict[str, int]]:
    """The codes of every output of the fixed cases, by case and output kind."""
    found: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases: dict[str, Case] = make_cases(Path(tmp))
        for name, case in cases.items():
            case.build(Path(tmp) / "out")
            states = build_presentation_states(case.result, case.sources, IDENTITY)
            kos = build_key_object_selection(
                case.result, case.sources, IDENTITY, sr=case.sr, presentation_states=states
            )
            objects = {"sr": [case.sr], "sc": case.scs, "pm": case.pms, "pr": states, "kos": [kos]}
            for kind, datasets in objects.items():
                counted: Counter[str] = Counter()
                for ds in datasets:
                    if ds is not None:
                        _codes(ds, kind, counted)
                found[f"{name}-{kind}"] = dict(sorted(counted.items()))
        colour = {  # finding sites and lateralities (retina, left, skin, blood) of colour photographs
            "fundus": colour_dataset("fundus", AnatomicRegionSequence=None, ImageLaterality="L"),
            "derm": colour_dataset("derm", Modality="DMS", AnatomicRegionSequence=None),
            "smear": colour_dataset("smear"),
        }
        for name, ds in colour.items():
            result = colour_result(ds)
            images = tuple(  # a heatmap method without a named kind: 'Visual explanation'
                dataclasses.replace(i, heatmaps=tuple(dataclasses.replace(h, method="x") for h in i.heatmaps))
                for i in result.images
            )
            result = dataclasses.replace(result, images=images)
            objects = {"sr": build_sr(result, [ds], IDENTITY)}
            objects["sc"] = build_heatmap_scs(result, {str(ds.SOPInstanceUID): ds}, IDENTITY)[0]
            for kind, out in objects.items():
                counted = Counter()
                _codes(out, kind, counted)
                found[f"{name}-{kind}"] = dict(sorted(counted.items()))
        sources, result, _ = phantom_result(Path(tmp) / "seg")
        seg = build_seg(result, sources, IDENTITY)
        assert seg is not None
        for kind, ds in {"seg": seg, "sr": build_sr(result, sources, IDENTITY, segmentation=seg)}.items():
            counted = Counter()
            _codes(ds, kind, counted)
            found[f"liver-{kind}"] = dict(sorted(counted.items()))
    return found


def test_the_writers_emit_the_recorded_codes() -> None:
    recorded = json.loads(GOLDEN.read_text(encoding="utf-8"))
    now = emitted()
    assert now.keys() == recorded.keys()
    for output, codes in recorded.items():
        assert now[output] == codes, output


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(emitted(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
