"""Typer commands for ``pacs-node models check`` and ``pacs-node evaluate`` (registered by node.cli)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from node.errors import NodeError

DEFAULT_ROOT = Path("models/onnx")
#: ``--labels feedback``: the stored radiologist feedback is the reference
FEEDBACK = "feedback"

models_app = typer.Typer(help="Inspect and check the installed models.", no_args_is_help=True)


def _model_dir(model: str, root: Path) -> Path:
    path = Path(model)
    return path if path.is_dir() and (path / "manifest.yaml").is_file() else root / model


@models_app.command("check")
def models_check(
    model: Annotated[str | None, typer.Argument(help="model id (or folder); default: every model")] = None,
    root: Annotated[Path, typer.Option("--models", help="models folder")] = DEFAULT_ROOT,
    provider: Annotated[
        list[str] | None, typer.Option("--provider", help="execution provider(s), in order")
    ] = None,
    threads: Annotated[int, typer.Option(help="intra-op threads")] = 2,
) -> None:
    """Load each manifest, verify its ONNX file, run a phantom of its modality through the node's
    preprocessing and runtime; print shapes, value ranges, provider and latency. Exit 1 on any failure."""
    from node.evaluate.check import check_model
    from node.inference.runtime import CPU

    if model is not None:
        dirs = [_model_dir(model, root)]
    elif root.is_dir():
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    else:
        dirs = []
    if not dirs:
        typer.echo(f"no models found under {root}", err=True)
        raise typer.Exit(1)
    failed = 0
    for d in dirs:
        report = check_model(d, tuple(provider or (CPU,)), threads=threads)
        typer.echo(f"[{report.model_id}] {'ok' if report.ok else 'FAILED'}")
        for line in report.lines:
            typer.echo(f"  {line}")
        failed += not report.ok
    typer.echo(f"{len(dirs) - failed} of {len(dirs)} model(s) passed")
    if failed:
        raise typer.Exit(1)


@models_app.command("export-triton")
def models_export_triton(
    out: Annotated[Path, typer.Argument(help="folder to write the Triton model repository into")],
    root: Annotated[Path, typer.Option("--models", help="models folder")] = DEFAULT_ROOT,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="model id to export (repeatable); default: all")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="max_batch_size of models with a dynamic batch")
    ] = 16,
    queue_delay_us: Annotated[
        int, typer.Option("--queue-delay-us", min=0, help="dynamic batching: longest wait to fill a batch")
    ] = 1000,
    instance_kind: Annotated[
        str, typer.Option("--instance-kind", help="auto (Triton chooses), gpu or cpu")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace model folders that exist")] = False,
) -> None:
    """Write a Triton model repository (OUT/<id>/config.pbtxt, OUT/<id>/1/model.onnx) from the
    manifests, for ``models.backend: triton``. Exit 2 when a model is refused or OUT holds it."""
    from node.inference.registry import load_registry
    from node.inference.triton_repo import export_repository

    if instance_kind not in ("auto", "gpu", "cpu"):
        raise typer.BadParameter("auto, gpu or cpu", param_hint="--instance-kind")
    registry = load_registry(root)
    for model_id, reason in sorted(registry.refused.items()):
        typer.echo(f"refused {model_id}: {reason}", err=True)
    wanted = list(model) if model else sorted(registry.models)
    try:
        models = [registry.get(m) for m in wanted]
        exported = export_repository(
            models,
            out,
            max_batch=max_batch,
            queue_delay_us=queue_delay_us,
            instance_kind=instance_kind,  # type: ignore[arg-type]  # checked above
            overwrite=overwrite,
        )
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for e in exported:
        typer.echo(f"{e.model_id}: {e.config_path} (max_batch_size {e.max_batch_size})")
    if not exported:
        typer.echo(f"no models found under {root}", err=True)
        raise typer.Exit(2)
    if registry.refused and not model:
        raise typer.Exit(2)


def evaluate(
    model: Annotated[str, typer.Argument(help="model id (under --models) or model folder")],
    data: Annotated[
        Path | None,
        typer.Argument(help="folder of labelled DICOM (searched recursively); none with --labels feedback"),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="CSV keyed by sop/series/study_instance_uid (default: truth.json sidecars), or "
            "'feedback': the node's stored radiologist feedback against its recorded results (see --config)",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="PACS_NODE_CONFIG",
            help="--labels feedback: the node's configuration (its database; default: config/node.yaml)",
        ),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="--labels feedback: verdicts given at or after (UTC)")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="--labels feedback: verdicts given before (UTC)")
    ] = None,
    model_version: Annotated[
        str | None, typer.Option("--model-version", help="--labels feedback: only this model version")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("evaluation"),
    root: Annotated[Path, typer.Option("--models", help="models folder")] = DEFAULT_ROOT,
    sensitivity: Annotated[
        float, typer.Option("--target-sensitivity", help="report the threshold reaching this sensitivity")
    ] = 0.9,
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="CSV column or DICOM keyword (PatientID, InstitutionName)"),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the 95% intervals")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    examples: Annotated[int, typer.Option(help="example heatmaps in the report")] = 4,
    threads: Annotated[int, typer.Option(help="intra-op threads")] = 2,
    map_label: Annotated[
        list[str] | None,
        typer.Option(
            "--map-label",
            help="TRUTH=MODEL: count a truth label as the model's label (repeatable), e.g. malignant=mass",
        ),
    ] = None,
    write_reference: Annotated[
        bool,
        typer.Option(
            "--write-reference",
            help="store the scores' and inputs' distribution in the model's manifest (reference:), "
            "against which live drift is measured",
        ),
    ] = False,
) -> None:
    """Run a model over labelled DICOM through the node's own path; write report.html and report.json.
    A segmentation model is also scored by Dice against the phantom truth masks, per label.
    ``--write-reference`` keeps the validation distribution in the manifest for drift monitoring."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from node.evaluate.classification import METRIC_NAMES
    from node.evaluate.dataset import collect_cases
    from node.evaluate.report import write_report
    from node.evaluate.run import analyse_cases, summarise
    from node.evaluate.segmentation import parse_label_map
    from node.inference.registry import load_model
    from node.inference.runtime import CPU, RuntimeConfig, create_session

    if labels == FEEDBACK:
        _evaluate_feedback(
            model, data, config, root, out, since, until, model_version, sensitivity, bootstrap, seed
        )
        return
    if data is None:
        raise typer.BadParameter("the folder of labelled DICOM (or --labels feedback)", param_hint="DATA")
    try:
        label_map = parse_label_map(map_label or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--map-label") from exc
    try:
        loaded = load_model(_model_dir(model, root))
        manifest = loaded.manifest
        cases = collect_cases(
            data,
            manifest.aggregation.level,
            [lb.name for lb in manifest.labels],
            labels_csv=Path(labels) if labels else None,
            group_by=group_by,
            label_map=label_map,
        )
        session = create_session(
            loaded,
            RuntimeConfig(providers=(CPU,), intra_op_threads=threads, inter_op_threads=1, max_batch=64),
        )
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"evaluating {manifest.id}", total=len(cases))
        outcomes, kept = analyse_cases(
            loaded,
            session,
            cases,
            examples=examples,
            progress=lambda i, o: bar.advance(task),
            label_map=label_map,
        )
    summary = summarise(
        loaded,
        outcomes,
        target_sensitivity=sensitivity,
        per_group=group_by is not None,
        n_boot=bootstrap,
        seed=seed,
        label_map=label_map,
    )
    html_path, json_path = write_report(summary, kept, out)
    if write_reference:
        from node.monitoring import reference as validation

        described = f"{data.name}: {len(cases)} cases"
        reference = validation.reference_from_evaluation(manifest, cases, outcomes, described)
        target = loaded.directory / "manifest.yaml"
        validation.write_reference(target, reference)
        typer.echo(f"wrote the validation reference ({reference.cases} cases) into {target}")
    if "segmentation" in summary:
        seg = summary["segmentation"]
        if seg is None:
            typer.echo("segmentation: no case had truth masks; no Dice")
        else:
            typer.echo(f"segmentation: Dice against the truth masks of {seg['cases_with_masks']} case(s)")
            for r in seg["labels"]:
                mean = "n/a" if r["mean_dice"] is None else f"{r['mean_dice']:.3f}"
                pooled = "n/a" if r["pooled_dice"] is None else f"{r['pooled_dice']:.3f}"
                typer.echo(
                    f"  {r['label']:10s} mean per study {mean} ({r['studies']} studies), pooled {pooled}, "
                    f"false-positive studies {r['false_positive_studies']}"
                )
    for f in summary["findings"]:
        m, ci, cm = f["metrics"], f["ci95"], f["confusion"]

        def show(name: str, m: dict = m, ci: dict = ci) -> str:
            v, (lo, hi) = m[name], ci[name]
            return (
                "n/a"
                if v is None
                else f"{v:.3f} [{lo if lo is None else f'{lo:.3f}'}, "
                + (f"{hi:.3f}]" if hi is not None else "None]")
            )

        typer.echo(
            f"{f['label']} ({f['positives']} pos / {f['negatives']} neg, threshold {f['threshold']:.4f})"
        )
        for name in ("auc", *(n for n in METRIC_NAMES if n != "auc")):  # AUC first
            typer.echo(f"  {name:18s} {show(name)}")
        typer.echo(f"  confusion          TP {cm['tp']} FP {cm['fp']} FN {cm['fn']} TN {cm['tn']}")
        op = f.get("operating_point")
        if op:
            typer.echo(
                f"  threshold for sensitivity {op['target_sensitivity']:.2f}: {op['threshold']:.4f} "
                f"(specificity {op['specificity']:.3f})"
            )
    if summary.get("class_accuracy") is not None:
        typer.echo(f"decision accuracy over the classes: {summary['class_accuracy']:.3f}")
    if summary["failed"]:
        typer.echo(f"{len(summary['failed'])} case(s) failed; see the report", err=True)
    typer.echo(f"wrote {html_path} and {json_path}")
    if summary["failed"]:
        raise typer.Exit(1)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _evaluate_feedback(
    model: str,
    data: Path | None,
    config: Path | None,
    root: Path,
    out: Path,
    since: datetime | None,
    until: datetime | None,
    version: str | None,
    sensitivity: float,
    bootstrap: int,
    seed: int,
) -> None:
    """``evaluate MODEL --labels feedback``: the node's recorded scores and decisions of MODEL
    against the radiologists' current verdicts (unsure ones left out); report.html and report.json
    with the agreement figures. Exit 1 when there is no feedback, 2 on a bad configuration."""
    from sqlmodel import Session

    from node.evaluate.feedback import feedback_summary
    from node.evaluate.report import write_report
    from node.inference.registry import load_model
    from node.settings import load_settings
    from node.store.db import make_engine
    from node.store.feedback import FeedbackFilter, list_feedback

    if data is not None:
        raise typer.BadParameter(
            "with --labels feedback the reference is the node's stored feedback on its recorded results: "
            "give no DATA folder",
            param_hint="DATA",
        )
    described: dict[str, object] = {"id": model, "name": model, "sha256": "", "research_use_only": False}
    try:  # the manifest names the model in the report; feedback on a removed model still counts
        manifest = load_model(_model_dir(model, root)).manifest
        described.update(id=manifest.id, name=manifest.name, research_use_only=manifest.research_use_only)
    except NodeError:
        pass
    try:
        engine = make_engine(load_settings(config).storage.url)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    wanted = FeedbackFilter(
        model_id=str(described["id"]), model_version=version, since=_utc(since), until=_utc(until)
    )
    try:
        with Session(engine) as session:
            rows = list_feedback(session, wanted)
    finally:
        engine.dispose()
    filters = {
        "model_version": version,
        "since": None if wanted.since is None else wanted.since.isoformat(),
        "until": None if wanted.until is None else wanted.until.isoformat(),
    }
    if not rows:
        shown = ", ".join(f"{k} {v}" for k, v in filters.items() if v is not None)
        typer.echo(f"no feedback on model {described['id']}{f' ({shown})' if shown else ''}", err=True)
        raise typer.Exit(1)
    versions = sorted({r.model_version for r in rows})
    described["version"] = ", ".join(versions)
    summary = feedback_summary(
        described, rows, target_sensitivity=sensitivity, n_boot=bootstrap, seed=seed, filters=filters
    )
    html_path, json_path = write_report(summary, [], out)
    typer.echo(f"{described['id']}: {len(rows)} verdicts ({summary['excluded_unsure']} unsure, left out)")
    for f in summary["agreement"]:
        typer.echo(
            f"{f['label']} ({f['model_version']}): {f['ratings']} ratings, agree {f['agree']}, "
            f"disagree {f['disagree']}, unsure {f['unsure']}"
        )
        typer.echo(f"  agreement rate     {_rate(f['agreement_rate'])}")
        typer.echo(f"  ppv from feedback  {_rate(f['ppv'])} ({f['model_positive']} positive decisions rated)")
        typer.echo(f"  npv from feedback  {_rate(f['npv'])}")
        typer.echo(f"  sensitivity        {_rate(f['sensitivity'])}")
        typer.echo(f"  specificity        {_rate(f['specificity'])}")
    typer.echo(f"wrote {html_path} and {json_path}")
