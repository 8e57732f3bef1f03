"""Ingest benchmark: the node vs DCMTK `storescp +B`, both receiving from DCMTK `storescu` on loopback.

Sends N small (~40 kB CT) and N large (~2 MB) instances, each with a fresh SOP Instance UID, over 1
and over 8 parallel associations (one storescu process each), to (a) the node (fsync before each
acknowledgement, and again with fsync off to show what durability costs) and (b) `storescp +B`
writing to a temp folder (`--fork` for parallel associations). Both servers are started here with
TCP_NODELAY=1 in their environment, and so are the storescu clients: without it, Nagle's algorithm
on the client adds ~40 ms to every instance, whoever receives. Prints instances/s, MB/s and the
server's CPU seconds, and the ratio node / storescp. A third set sends each small instance on its
own association (one storescu run per file), as modalities send one-image studies: there the cost
of accepting an association counts, and so does starting storescu, for both servers alike.

    .venv/bin/python bench/ingest.py [--small 400] [--large 60]
    .venv/bin/python bench/ingest.py --receivers 1 2 4   # also N node processes on one port

``--receivers N``: the node runs as N `--role receiver` processes sharing the DICOM port
(``dicom.reuse_port``) on one PostgreSQL database started on loopback (as the tests do); the CPU
column sums the N processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import free_port, fresh_copy, sample_file, wait_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_small(folder: Path, n: int) -> list[Path]:
    """n copies of pydicom's CT_small.dcm (~39 kB) with fresh UIDs."""
    study = generate_uid()
    return [fresh_copy(sample_file("CT_small.dcm"), folder / f"s{i:05d}.dcm", study) for i in range(n)]


def make_large(folder: Path, n: int) -> list[Path]:
    """n 1024x1024 16-bit CT images (~2 MB) with fresh UIDs and random-ish pixels."""
    template = pydicom.dcmread(sample_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(1024, 1024), dtype=np.uint16)
    template.Rows, template.Columns = 1024, 1024
    template.PixelData = pixels.tobytes()
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        path = folder / f"l{i:05d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def send_parallel(port: int, files: list[Path], parallel: int, called: str) -> float:
    """storescu processes, one association each, over an equal share of files; wall seconds."""
    shares = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for share in shares
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def send_each(port: int, files: list[Path], parallel: int, called: str) -> float:
    """One storescu process and association per file (how a modality sends a study of one image),
    ``parallel`` of them at a time; wall seconds."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "TCP_NODELAY": "1"}

    def one(path: Path) -> None:
        done = subprocess.run(
            ["storescu", "-aec", called, "127.0.0.1", str(port), str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed: {done.stderr.decode()[-500:]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - started


def _wait_bound(pid: int, port: int, timeout: float = 120) -> None:
    """Wait until process ``pid`` itself listens on TCP ``port`` (another may listen there too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
        try:
            fds = {os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            fds = set()
        if any(f"socket:[{inode}]" in fds for inode in inodes):
            return
        time.sleep(0.2)
    raise RuntimeError(f"process {pid} did not listen on port {port}")


class Server:
    """A receiving server (one or several processes) started for one measurement."""

    def __init__(
        self, kind: str, workdir: Path, parallel: int, receivers: int = 0, database: str = ""
    ) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.procs: list[subprocess.Popen] = []
        if kind == "storescp":
            out = workdir / "storescp"
            out.mkdir()
            # one process for one association (its CPU is then exact); --fork for concurrent ones, whose
            # children's CPU counts once storescp has reaped them
            fork = ["--fork"] if parallel > 1 else []
            cmd = ["storescp", "+B", *fork, "-od", str(out), str(self.port)]
            self.called = "ANY-SCP"
        else:
            config = {
                "dicom": {"host": "127.0.0.1", "port": self.port, "max_associations": 32},
                "web": {"enabled": False},
                "storage": {"data_dir": str(workdir / "node"), "fsync": kind == "node", "min_free_mb": 0},
                "logging": {"level": "WARNING"},
            }
            self.called = "PACSNODE"
            if receivers:
                config["dicom"]["reuse_port"] = True
                config["storage"]["database_url"] = database
            for i in range(max(receivers, 1)):
                if receivers:
                    config["cluster"] = {"node_id": f"receiver-{i}"}
                path = workdir / f"node{i}.yaml"
                path.write_text(yaml.safe_dump(config))
                role = ["--role", "receiver"] if receivers else []
                cmd = [sys.executable, "-m", "node", "serve", "--config", str(path), *role]
                self.procs.append(
                    subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
                _wait_bound(self.procs[-1].pid, self.port)  # each listening before the next starts
        if not self.procs:
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        wait_port(self.port)
        time.sleep(0.3)

    def cpu(self) -> float:
        """CPU seconds of its processes so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(
    kind: str, files: list[Path], parallel: int, each: bool = False, receivers: int = 0, database: str = ""
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        server = Server(kind, Path(tmp), parallel, receivers, database)
        try:
            cpu0 = server.cpu()
            send = send_each if each else send_parallel
            wall = send(server.port, files, parallel, server.called)
            time.sleep(0.5)  # let storescp --fork reap its children
            cpu = server.cpu() - cpu0
        finally:
            server.stop()
    size = sum(f.stat().st_size for f in files)
    return {
        "wall": wall,
        "ips": len(files) / wall,
        "mbps": size / wall / 1e6,
        "cpu": cpu,
        "cpu_per_gb": cpu / (size / 1e9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=400, help="number of ~40 kB instances")
    parser.add_argument("--large", type=int, default=60, help="number of ~2 MB instances")
    parser.add_argument("--each", type=int, default=100, help="~40 kB instances sent one per association")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per cell")
    parser.add_argument(
        "--receivers",
        type=int,
        nargs="*",
        default=[],
        help="also N receiver processes on one port (dicom.reuse_port, loopback PostgreSQL), per N",
    )
    args = parser.parse_args()
    pg = None
    if args.receivers:
        from tests.store.pgserver import PostgresServer, postgres_bindir

        bindir = postgres_bindir()
        if bindir is None:
            sys.exit("--receivers needs PostgreSQL: apt-get install postgresql")
        pg = PostgresServer(bindir)
    try:
        _run(args, pg)
    finally:
        if pg is not None:
            pg.stop()


def _run(args: argparse.Namespace, pg: object) -> None:
    """Every cell of the table."""
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        sets = {
            "small ~40 kB": make_small(Path(data) / "small", args.small),
            "large ~2 MB": make_large(Path(data) / "large", args.large),
            "1/assoc 40 kB": make_small(Path(data) / "each", args.each),
        }
        print(
            f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}"
        )
        header = (
            f"{'instances':<13}{'assoc':>6} {'server':<16}{'inst/s':>9}{'MB/s':>9}"
            f"{'CPU s':>8}{'CPU s/GB':>10}{'÷ storescp':>12}"
        )
        print(header)
        print("-" * len(header))
        for label, files in sets.items():
            for parallel in args.parallel:
                results = {}
                each = label.startswith("1/assoc")
                for kind in ("storescp", "node", "node-nofsync"):
                    runs = [measure(kind, files, parallel, each) for _ in range(args.repeat)]
                    results[kind] = max(runs, key=lambda r: r["ips"])
                for n in args.receivers:
                    runs = [
                        measure("node", files, parallel, each, n, pg.new_database())  # type: ignore[attr-defined]
                        for _ in range(args.repeat)
                    ]
                    results[f"node-x{n}"] = max(runs, key=lambda r: r["ips"])
                base = results["storescp"]["ips"]
                for kind, r in results.items():
                    name = {
                        "storescp": "storescp +B",
                        "node": "node (fsync)",
                        "node-nofsync": "node (no fsync)",
                    }.get(kind) or f"node ×{kind.removeprefix('node-x')} (PG)"
                    ratio = f"{r['ips'] / base:.2f}" if kind != "storescp" else "1.00"
                    print(
                        f"{label:<13}{parallel:>6} {name:<16}{r['ips']:>9.1f}{r['mbps']:>9.1f}"
                        f"{r['cpu']:>8.2f}{r['cpu_per_gb']:>10.1f}{ratio:>12}"
                    )


if __name__ == "__main__":
    main()
