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

    .venv/bin/python bench/scale.py                 # 1 2 3 workers, 8 studies, 3 probes
    .venv/bin/python bench/scale.py --workers 1 2 4 8 --studies 48

Needs PostgreSQL (apt-get install postgresql) and DCMTK. Small defaults run in a few minutes on a
two-core machine, where two and three workers compete for the same cores (and with the receiver
and the sender): the ratio shows where the cores run out, not a property of the queue.
"""

from __future__ import annotations

import argparse
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
class Cell:
    """What one worker count measured."""

    workers: int
    jobs: int
    seconds: float
    claim_s: list[float]  # probes: routed -> claimed
    result_s: list[float]  # probes: routed -> done

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
    pg: object, workdir: Path, workers: int, studies: list[list[Path]], probes: list[list[Path]]
) -> Cell:
    """One worker count: fill the queue, start the workers, time them; then the probes."""
    db = pg.new_database()  # type: ignore[attr-defined]
    shared = workdir / "shared-data"
    dest = Destination(workdir / "received")
    procs: list[NodeProcess] = []

    def node(name: str, role: str) -> NodeProcess:
        config = node_config(workdir / name, name, db, shared, dest.port, "", lease_s=60.0)
        data = yaml.safe_load(config.read_text())
        data["runner"]["workers"] = 1  # one job at a time per process: N processes, N jobs
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
            "select extract(epoch from started_at - created_at), extract(epoch from finished_at - created_at)"
            f" from job order by id offset {len(studies)}",
        )
        failed = _count(db, "state != 'done'")
        if failed:
            raise RuntimeError(f"{failed} jobs not done")
        return Cell(workers, len(studies), seconds, [float(r[0]) for r in rows], [float(r[1]) for r in rows])
    finally:
        for proc in procs:
            proc.stop()
        dest.stop()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(cells: list[Cell]) -> str:
    """The table: jobs/s, ratio against linear, queue overhead and its share of time to result."""
    base = next((c.rate for c in cells if c.workers == 1), cells[0].rate / cells[0].workers)
    lines = [
        f"{'workers':>7} {'jobs':>5} {'seconds':>8} {'jobs/s':>7} {'vs linear':>9}"
        f" {'routed->claimed ms':>19} {'time to result s':>17} {'queue share':>11}",
    ]
    for c in cells:
        claim, result = _median(c.claim_s), _median(c.result_s)
        lines.append(
            f"{c.workers:>7} {c.jobs:>5} {c.seconds:>8.1f} {c.rate:>7.2f}"
            f" {c.rate / (c.workers * base):>8.2f}x"
            f" {claim * 1000:>19.0f} {result:>17.2f} {claim / result:>10.1%}"
        )
    lines.append(
        f"(median of the probes; {os.cpu_count()} CPUs; one receiver and one sender process"
        " beside the workers)"
    )
    return "\n".join(lines)


def main() -> None:
    """Run every worker count and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker process counts")
    parser.add_argument("--studies", type=int, default=8, help="studies queued before the workers start")
    parser.add_argument("--probe", type=int, default=3, help="studies sent one at a time (queue overhead)")
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
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            root = Path(tmp)
            studies = make_studies(root / "in", args.studies, 1000)
            probes = make_studies(root / "in", args.probe, 5000)
            cells = []
            for n in args.workers:
                # fresh UIDs per cell would need new studies; a fresh database and data folder
                # per cell make the same files new again
                cell = run_cell(pg, root / f"workers-{n}", n, studies, probes)
                log.info("%d workers: %d jobs in %.1f s", n, cell.jobs, cell.seconds)
                cells.append(cell)
            print(report(cells))
            log.info("%.0f s in all", time.monotonic() - started)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
