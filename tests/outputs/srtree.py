"""Small readers of SR content trees for the tests (pydicom data sets, no highdicom parsing)."""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset


def name_of(item: Dataset) -> tuple[str, str]:
    """(code value, scheme) of a content item's concept name, ("", "") when it has none."""
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return "", ""
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def walk(ds: Dataset) -> Iterator[Dataset]:
    """Every content item under ``ds`` (depth first, ``ds`` itself excluded)."""
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from walk(item)


def children(item: Dataset, value: str, scheme: str = "DCM") -> list[Dataset]:
    """The direct children of ``item`` whose concept name is (value, scheme)."""
    return [c for c in item.get("ContentSequence") or [] if name_of(c) == (value, scheme)]


def child(item: Dataset, value: str, scheme: str = "DCM") -> Dataset:
    """The one direct child of ``item`` named (value, scheme)."""
    found = children(item, value, scheme)
    assert len(found) == 1, f"expected one ({value}, {scheme}) under {name_of(item)}, found {len(found)}"
    return found[0]


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The TID 1501 measurement groups of a TID 1500 report."""
    return children(child(sr, "126010"), "125007")


def code_designators(ds: Dataset) -> set[str]:
    """Every Coding Scheme Designator used anywhere in ``ds`` (all nested sequences)."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "CodingSchemeDesignator" and elem.value:
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for sub in elem.value:
                    visit(sub)

    visit(ds)
    return found


def image_refs(item: Dataset) -> list[tuple[str, list[int]]]:
    """(SOP Instance UID, frame numbers) of the Referenced SOP Sequence of an IMAGE item."""
    out = []
    for ref in item.get("ReferencedSOPSequence") or []:
        frames = ref.get("ReferencedFrameNumber")
        if frames is None:
            numbers: list[int] = []
        elif isinstance(frames, int | str):
            numbers = [int(frames)]
        else:
            numbers = [int(f) for f in frames]
        out.append((str(ref.ReferencedSOPInstanceUID), numbers))
    return out
