"""``pacs-node synth``: write synthetic phantom studies to disk (registered by the node's CLI)."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class Kind(StrEnum):
    """Phantom kinds."""

    cxr = "cxr"
    mammo = "mammo"
    ct = "ct"
    mr = "mr"
    fundus = "fundus"
    derm = "derm"
    smear = "smear"


_PHOTO = (Kind.fundus, Kind.derm, Kind.smear)


def synth(
    kind: Annotated[Kind, typer.Argument(help="Phantom kind: cxr, mammo, ct, mr, fundus, derm or smear.")],
    count: Annotated[int, typer.Option("--count", "-n", min=0, help="Number of studies to write.")] = 10,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory; one sub-directory per study.")
    ] = Path("synth"),
    seed: Annotated[int, typer.Option(min=0, help="Base seed; the same seed writes the same studies.")] = 0,
    label: Annotated[
        str | None,
        typer.Option(
            help="Force a label (cxr: tuberculosis, pneumonia, tuberculosis+pneumonia or none; mammo/ct: "
            "normal, benign, malignant; mr: normal, tumour; fundus: normal, referable_dr; derm: naevus, "
            "melanoma; smear: normal, plasmodium). Default: balanced random labels."
        ),
    ] = None,
    scale: Annotated[
        float | None, typer.Option(min=0.05, max=2.0, help="cxr/mammo: image size factor (e.g. 0.25).")
    ] = None,
    slices: Annotated[int | None, typer.Option(min=1, help="ct/mr: slices per series.")] = None,
    size: Annotated[
        int | None, typer.Option(min=32, help="ct/mr: rows = columns per slice; fundus/derm/smear: side.")
    ] = None,
    modality: Annotated[str | None, typer.Option(help="cxr: CR or DX (default random).")] = None,
    laterality: Annotated[str | None, typer.Option(help="fundus: R or L (default random).")] = None,
    jpeg: Annotated[
        bool | None,
        typer.Option(
            "--jpeg/--no-jpeg",
            help="fundus/derm/smear: JPEG baseline (YBR_FULL_422) instead of uncompressed RGB.",
        ),
    ] = None,
    sequence: Annotated[str | None, typer.Option(help="mr: T2, FLAIR or T1C (default random).")] = None,
    region: Annotated[
        str | None,
        typer.Option(
            help="ct: abdomen (default), head, chest or pelvis; mr: head (default), abdomen or pelvis. "
            "Regions other than the default carry no lesions (label normal)."
        ),
    ] = None,
    body_part: Annotated[
        bool | None,
        typer.Option(
            "--body-part/--no-body-part",
            help="ct/mr: write BodyPartExamined and descriptions naming the region (default), or "
            "neither, as many real files (for routing checks).",
        ),
    ] = None,
    uid_root: Annotated[
        str | None, typer.Option(help="UID root for generated UIDs (default: pydicom's root).")
    ] = None,
    seeded_uids: Annotated[
        bool,
        typer.Option(
            "--seeded-uids/--random-uids", help="Derive UIDs from the seed (reproducible) or draw fresh ones."
        ),
    ] = True,
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help="Write lesion masks as PNG.")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Processes to generate with.")] = 1,
) -> None:
    """Generate synthetic DICOM studies with known lesions and a truth.json per study."""
    options: dict[str, Any] = {}
    per_kind = {
        "scale": (scale, {Kind.cxr, Kind.mammo}),
        "slices": (slices, {Kind.ct, Kind.mr}),
        "size": (size, {Kind.ct, Kind.mr, *_PHOTO}),
        "modality": (modality, {Kind.cxr}),
        "laterality": (laterality, {Kind.fundus}),
        "jpeg": (jpeg, set(_PHOTO)),
        "sequence": (sequence, {Kind.mr}),
        "region": (region, {Kind.ct, Kind.mr}),
        "body_part": (body_part, {Kind.ct, Kind.mr}),
    }
    for name, (value, kinds) in per_kind.items():
        if value is None:
            continue
        if kind not in kinds:
            raise typer.BadParameter(f"--{name} applies to {', '.join(sorted(k.value for k in kinds))} only")
        options[name] = value
    default_region = {Kind.ct: "abdomen", Kind.mr: "head"}.get(kind)
    if region is not None and region.lower() != default_region and label is None:
        label = "normal"  # region phantoms carry no lesions
    start = time.perf_counter()
    try:
        from .study import generate_studies  # OpenCV and the renderers load only here

        truths = generate_studies(
            kind.value,
            count,
            out,
            seed,
            label,
            workers=workers,
            uid_root=uid_root,
            seeded_uids=seeded_uids,
            write_masks=masks,
            **options,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    elapsed = time.perf_counter() - start
    instances = sum(len(t.instances) for t in truths)
    counts: dict[str, int] = {}
    for t in truths:
        key = "+".join(t.labels) or "none"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    typer.echo(
        f"wrote {len(truths)} {kind.value} studies ({instances} instances) to {out} "
        f"in {elapsed:.1f} s ({instances / max(elapsed, 1e-9):.1f} images/s); labels {summary or '-'}"
    )
