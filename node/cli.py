"""The `pacs-node` command line (Typer)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node import __version__
from node.errors import NodeError

if TYPE_CHECKING:  # the app, uvicorn and the models load only for the commands that need them
    import uvicorn

    from node.app import Node

app = typer.Typer(
    name="pacs-node",
    help="DICOM inference node for radiology (research models, not for diagnosis).",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("node")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="PACS_NODE_CONFIG", help="YAML configuration (default: config/node.yaml)"
    ),
]


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with times; pynetdicom's own chatter stays at warnings."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pacs-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DICOM inference node for radiology."""


@app.command()
def serve(
    config: ConfigOpt = None,
    role: Annotated[
        str,
        typer.Option(
            help="all: one process does everything (default); receiver: DICOM listener, assembly "
            "and routing; worker: runs jobs; sender: the outbox and webhooks (PostgreSQL only)"
        ),
    ] = "all",
) -> None:
    """Run the node: DICOM listener, assembly and the status page, until SIGINT/SIGTERM."""
    from node.app import build_node
    from node.settings import load_settings

    try:
        settings = load_settings(config)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(settings.logging.level)
    try:
        node = build_node(settings, role)
        node.start()
    except (NodeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    web = _start_web(node) if settings.web.enabled else None
    try:
        while not stop.wait(0.5):
            if web is not None and not web[1].is_alive():
                log.error("the web server stopped; shutting down")
                break
    finally:
        log.info("stopping")
        if web is not None:
            web[0].should_exit = True
            web[1].join(timeout=10)
        node.stop()


def _start_web(node: Node) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve the status page and API from a thread (signals stay with the main thread)."""
    import uvicorn

    web = node.settings.web
    config = uvicorn.Config(
        node.web_app(), host=web.host, port=web.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="web", daemon=True)
    thread.start()
    log.info("status page on http://%s:%d/", web.host, web.port)
    return server, thread


@app.command()
def echo(
    host: str,
    port: int,
    aet: Annotated[str, typer.Option(help="our (calling) AE title")] = "PACSNODE-SCU",
    aec: Annotated[str, typer.Option(help="the peer's (called) AE title")] = "ANY-SCP",
) -> None:
    """Send a C-ECHO to HOST PORT; exit 0 when it answers success."""
    from node.dicom import scu, status

    setup_logging("WARNING")
    try:
        code = scu.echo(host, port, aet, aec)
    except NodeError as exc:
        typer.echo(f"echo failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"C-ECHO {aec}@{host}:{port}: {status.name(code)}")
    if code != status.SUCCESS:
        raise typer.Exit(1)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="files or folders (searched recursively)")],
    host: Annotated[str, typer.Option(help="peer host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="peer port")] = 11112,
    aet: Annotated[str, typer.Option(help="our (calling) AE title")] = "PACSNODE-SCU",
    aec: Annotated[str, typer.Option(help="the peer's (called) AE title")] = "ANY-SCP",
) -> None:
    """C-STORE DICOM files to a peer, as stored (no decoding); exit 1 if any failed."""
    from node.dicom import scu

    setup_logging("WARNING")
    files = list(scu.collect_files(paths))
    if not files:
        typer.echo("no DICOM files found", err=True)
        raise typer.Exit(1)
    report = scu.send_files(files, host, port, aet, aec)
    for path, reason in report.failed:
        typer.echo(f"failed: {path}: {reason}", err=True)
    typer.echo(f"sent {len(report.sent)} of {len(files)} files to {aec}@{host}:{port}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def route(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively)")],
    rules: Annotated[
        Path | None, typer.Option("--rules", help="routing rules file (default: the configuration's)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every rule tried and why")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print which routing rule and model each file matches, and why (a rule tester for IT).

    Exits 0 when every file could be read (routed or not), 1 when some could not, 2 when the
    rules or the configuration are invalid."""
    from node.pipeline.route import explain_report
    from node.pipeline.route_rules import load_rules
    from node.settings import load_settings

    setup_logging("WARNING")
    try:
        rules_file = rules if rules is not None else load_settings(config).routing.rules_file
        rule_set = load_rules(rules_file)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    lines, code = explain_report(rule_set, paths, verbose=verbose)
    if not lines:
        typer.echo("no files found", err=True)
        raise typer.Exit(1)
    for line in lines:
        typer.echo(line)
    raise typer.Exit(code)


def _settings_or_exit(config: Path | None):  # noqa: ANN202 - node.settings.Settings
    """The validated settings for a one-shot command (quiet logging); exit 2 naming what is wrong."""
    from node.settings import load_settings

    try:
        settings = load_settings(config)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging("WARNING")
    return settings


@app.command()
def retry(
    job: Annotated[
        int | None, typer.Option("--job", help="only this job id (default: every failed one)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Requeue failed jobs and parked outputs; a running node picks them up within seconds."""
    from sqlmodel import Session

    from node.store.db import make_engine
    from node.store.repo import requeue_failed_jobs, requeue_failed_outputs
    from node.store.tables import utcnow

    engine = make_engine(_settings_or_exit(config).storage.url)
    with Session(engine) as session:
        now = utcnow()
        jobs = requeue_failed_jobs(session, now, job)
        outputs = requeue_failed_outputs(session, now, job)
        session.commit()
    typer.echo(f"requeued {jobs} jobs and {outputs} outputs")


db_app = typer.Typer(
    help="The node's database schema: show its revision, apply migrations.", no_args_is_help=True
)
app.add_typer(db_app, name="db")


def _db_engine(config: Path | None):  # noqa: ANN202 - sqlalchemy Engine
    from node.store.db import make_engine

    return make_engine(_settings_or_exit(config).storage.url, check_schema=False)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    config: ConfigOpt = None,
) -> None:
    """Apply the migrations (back the database up first); safe to run again."""
    from node.store.db import upgrade

    engine = _db_engine(config)
    try:
        before, after = upgrade(engine, revision)
    except Exception as exc:  # driver or migration error: report it, exit non-zero
        typer.echo(f"error: the upgrade failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(
        f"database schema: {before or 'empty'} -> {after}" if before != after else f"up to date ({after})"
    )


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Print the database's schema revision and the one this version needs; exit 1 if they differ."""
    from node.store.db import schema_status

    engine = _db_engine(config)
    try:
        current, head = schema_status(engine)
    finally:
        engine.dispose()
    typer.echo(f"database: {current or 'empty'}; this version needs: {head}")
    if current != head:
        raise typer.Exit(1)


@db_app.command("prune")
def db_prune(
    older_than_days: Annotated[
        float | None, typer.Option(help="remove finished studies last received before this many days")
    ] = None,
    min_free_gb: Annotated[
        float, typer.Option(help="then remove the oldest finished studies while free space is below this")
    ] = 0.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be removed")] = False,
    config: ConfigOpt = None,
) -> None:
    """Retention: delete the rows and files (spool, outbox) of studies whose jobs are all done and
    whose outputs are all sent (or that nothing was routed to); run it from a timer or cron."""
    from datetime import timedelta

    from node.settings import load_settings
    from node.store.retention import prune
    from node.store.tables import utcnow

    if older_than_days is None and not min_free_gb:
        typer.echo("error: give --older-than-days and/or --min-free-gb", err=True)
        raise typer.Exit(2)
    from node.store.db import make_engine

    try:
        settings = load_settings(config)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging("WARNING")
    engine = make_engine(settings.storage.url)
    objects = None
    if settings.storage.object_store is not None:  # the shared copies go too
        from node.store.objects import ObjectStore

        objects = ObjectStore(settings.storage.object_store)
    try:
        report = prune(
            engine,
            settings.storage.data_dir,
            settings.storage.spool_dir,
            utcnow(),
            max_age=timedelta(days=older_than_days) if older_than_days is not None else None,
            min_free_bytes=int(min_free_gb * 2**30),
            dry_run=dry_run,
            objects=objects,
        )
    finally:
        engine.dispose()
        if objects is not None:
            objects.close()
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(report.studies)} studies ({report.files} files, {report.bytes / 1e6:.1f} MB)")


def _register_tools() -> None:
    """Commands whose code lives beside the node's core."""
    from node.synth.cli import synth

    app.command(name="synth", help="Write synthetic phantom studies (DICOM + truth.json).")(synth)
    from node.evaluate.cli import evaluate, models_app

    app.add_typer(models_app, name="models")
    app.command(name="evaluate")(evaluate)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def convert(ctx: typer.Context) -> None:
    """Convert a PyTorch or Keras model to ONNX with parity checks (`pacs-node convert --help`)."""
    converters_cli = _import_converters_cli()
    converters_cli.app(args=list(ctx.args), prog_name="pacs-node convert")


def _import_converters_cli():  # noqa: ANN202 - module type
    """Import ``converters.cli`` lazily (``node`` never imports converters at import time); the
    ``converters`` package is installed with ``node`` (pyproject's packages)."""
    import importlib

    try:
        return importlib.import_module("converters.cli")
    except ModuleNotFoundError as exc:
        if exc.name in ("converters", "converters.cli"):
            what = "the converters package is not installed"
            typer.echo(f"error: {what}: pip install -e '.[convert]'", err=True)
        else:
            typer.echo(f"error: the converters need {exc.name!r}: pip install -e '.[convert]'", err=True)
        raise typer.Exit(2) from exc


_register_tools()


def main() -> None:
    """Console-script entry point."""
    app()
