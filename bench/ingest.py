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
    .venv/bin/python bench/ingest.py --small 300 --large 0 --each 0 --bare --before /tmp/old

``--bare``: two more peers, to tell pynetdicom's own cost per instance from the node's: a pynetdicom
AE with the node's settings (contexts, dicom.max_pdu, timeouts) whose C-STORE handler returns
0x0000 without touching the data set, through the node's transport ("bare gated": the gate, the
socket that sleeps in poll, the reactor woken by events) and through pynetdicom's own server
("bare stock": its 1 ms polling loops); then the CPU of a minimal Python DUL/DIMSE receiver
(:func:`minimal_dul_cpu`), what replacing pynetdicom's per-PDU and per-message machinery could
cost. ``--before DIR``: also the node of another checkout (a ``git worktree`` of an older commit)
in the same run. The columns ms/inst (server CPU per instance) and CPU × (the server's CPU as a
multiple of storescp's) are the 2-core goal's measures.

``--receivers N``: the node runs as N `--role receiver` processes sharing the DICOM port
(``dicom.reuse_port``) on one PostgreSQL database started on loopback (as the tests do); the CPU
column sums the N processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def serve_bare(port: int, mode: str) -> None:
    """A pynetdicom C-STORE SCP whose handler returns 0x0000 without touching the data set: the
    floor of pynetdicom's own per-association, per-PDU and per-message cost. Same AE settings as
    the node (its supported contexts and transfer syntaxes, dicom.max_pdu, the timeouts).
    ``gated``: through the node's transport (node.dicom.transport: the gate, the socket that
    sleeps in poll, the reactor that waits on an event), so the node minus its C-STORE handler;
    ``stock``: pynetdicom's own server (the DUL and the reactor polling every 1 ms, as shipped)."""
    import threading

    from pynetdicom import evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.allowlist import AllowList
    from node.dicom.scp import TRANSFER_SYNTAXES, _SharedContext, configured_ae
    from node.dicom.sop_classes import storage_sop_classes
    from node.dicom.transport import Gate, NetworkLimits, start_gated_server
    from node.prometheus import NodeMetrics
    from node.settings import DicomSettings

    s = DicomSettings(host="127.0.0.1", port=port, max_associations=32)
    ae = configured_ae(s)  # the node's PDU size, limits and timeouts
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def on_store(event: evt.Event) -> int:
        return 0x0000

    def on_connect(event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_connect)]
    contexts: list[Any] = [_SharedContext.of(cx) for cx in ae.supported_contexts]
    if mode == "gated":
        gate = Gate(NetworkLimits.of(s), AllowList.parse([]), NodeMetrics())
        start_gated_server(ae, ("127.0.0.1", port), gate, handlers, contexts)
    else:
        ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers, contexts=contexts)
    threading.Event().wait()


def _recv_exactly(sock: Any, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise EOFError
        view = view[got:]


def _command_uid(command: bytes | bytearray, wanted: int) -> bytes:
    """A value of an implicit VR little endian command set (the minimal DUL's only parser)."""
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, pos)
        if group << 16 | elem == wanted:
            return bytes(command[pos + 8 : pos + 8 + length])
        pos += 8 + length
    return b""


def _store_response(message_id: bytes, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RSP (success) in one P-DATA-TF PDU."""

    def el(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0, elem, len(value)) + value

    body = b"".join(
        (
            el(0x0002, sop_class),
            el(0x0100, struct.pack("<H", 0x8001)),
            el(0x0120, message_id),
            el(0x0800, struct.pack("<H", 0x0101)),
            el(0x0900, struct.pack("<H", 0)),
            el(0x1000, sop_instance),
        )
    )
    command = el(0x0000, struct.pack("<L", len(body))) + body
    pdv = struct.pack(">LBB", len(command) + 2, 1, 0x03) + command
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def minimal_dul_cpu(n: int, max_pdu: int) -> float:
    """CPU ms per ~40 kB instance of a minimal Python DUL/DIMSE receiver (what replacing
    pynetdicom's per-PDU and per-message machinery could cost): over loopback TCP a sender thread
    writes the P-DATA-TF PDUs of one C-STORE-RQ (built by pynetdicom, ``max_pdu`` bytes at most)
    and waits for the response, as storescu does; the receiver reads each PDU (header, then body),
    walks its PDVs, joins the data set's fragments, reads the command's three values it answers
    with and sends a prebuilt C-STORE-RSP. Only the receiving thread's CPU is counted; nothing is
    written to disk (the node's own filing cost comes on top)."""
    import socket
    import threading
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    raw = Path(sample_file("CT_small.dcm")).read_bytes()
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(raw[128:])  # the whole file's bytes stand in for the data set (~39 kB)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    encoded = []
    for primitive in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        encoded.append(pdu.encode())
    pdus = b"".join(encoded)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    for sock in (client, conn):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send() -> None:
        answer = bytearray(256)
        for _ in range(n):
            client.sendall(pdus)
            header = memoryview(answer)[:6]
            _recv_exactly(client, header)
            _recv_exactly(client, memoryview(answer)[6 : 6 + struct.unpack_from(">L", answer, 2)[0]])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    header = bytearray(6)
    started = time.thread_time()
    for _ in range(n):
        command = bytearray()
        data = bytearray()
        done = False
        while not done:
            _recv_exactly(conn, memoryview(header))
            length = struct.unpack_from(">L", header, 2)[0]
            body = bytearray(length)
            _recv_exactly(conn, memoryview(body))
            pos = 0
            while pos < length:
                item_length, _context, control = struct.unpack_from(">LBB", body, pos)
                fragment = memoryview(body)[pos + 6 : pos + 4 + item_length]
                (command if control & 1 else data).extend(fragment)
                done = control == 0x02  # the data set's last fragment
                pos += 4 + item_length
        conn.sendall(
            _store_response(
                _command_uid(command, 0x00000110),
                _command_uid(command, 0x00000002),
                _command_uid(command, 0x00001000),
            )
        )
    cpu = time.thread_time() - started
    sender.join()
    for sock in (client, conn, server):
        sock.close()
    return cpu / n * 1e3


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
        self,
        kind: str,
        workdir: Path,
        parallel: int,
        receivers: int = 0,
        database: str = "",
        before: Path | None = None,
    ) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        env = {**os.environ, "TCP_NODELAY": "1"}
        cwd = None
        if kind == "node-before":  # the node of another checkout (``--before``), fsync on
            assert before is not None
            kind, cwd = "node", str(before)
            env["PYTHONPATH"] = str(before)
        self.procs: list[subprocess.Popen] = []
        if kind == "storescp":
            out = workdir / "storescp"
            out.mkdir()
            # one process for one association (its CPU is then exact); --fork for concurrent ones, whose
            # children's CPU counts once storescp has reaped them
            fork = ["--fork"] if parallel > 1 else []
            cmd = ["storescp", "+B", *fork, "-od", str(out), str(self.port)]
            self.called = "ANY-SCP"
        elif kind.startswith("bare-"):
            cmd = [sys.executable, __file__, "--serve-bare", str(self.port), kind.removeprefix("bare-")]
            self.called = "PACSNODE"
        else:
            config: dict[str, Any] = {
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
                    subprocess.Popen(
                        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
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
    kind: str,
    files: list[Path],
    parallel: int,
    each: bool = False,
    receivers: int = 0,
    database: str = "",
    before: Path | None = None,
) -> dict[str, float]:
    """One cell: start the server, send ``files``, stop it; wall, rates and the server's CPU."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        server = Server(kind, Path(tmp), parallel, receivers, database, before)
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
    parser.add_argument(
        "--bare",
        action="store_true",
        help="also bare pynetdicom SCPs (C-STORE handler returning 0x0000 untouched): 'bare gated' "
        "through the node's transport, 'bare stock' with pynetdicom's own server",
    )
    parser.add_argument("--no-nofsync", action="store_true", help="skip the node (no fsync) rows")
    parser.add_argument(
        "--before",
        type=Path,
        help="also the node of this checkout (e.g. a `git worktree` of an older commit), fsync on",
    )
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
        return
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
            f"{'CPU s':>8}{'CPU s/GB':>10}{'ms/inst':>9}{'÷ storescp':>12}{'CPU ×':>8}"
        )
        print(header)
        print("-" * len(header))
        kinds = ["storescp", "node"]
        if args.before is not None:
            kinds.append("node-before")
        if not args.no_nofsync:
            kinds.append("node-nofsync")
        if args.bare:
            kinds += ["bare-gated", "bare-stock"]
        for label, files in sets.items():
            if not files:
                continue
            for parallel in args.parallel:
                results = {}
                each = label.startswith("1/assoc")
                for kind in kinds:
                    runs = [
                        measure(kind, files, parallel, each, before=args.before) for _ in range(args.repeat)
                    ]
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
                        "node-before": "node (before)",
                        "bare-gated": "bare gated",
                        "bare-stock": "bare stock",
                    }.get(kind) or f"node ×{kind.removeprefix('node-x')} (PG)"
                    ratio = f"{r['ips'] / base:.2f}" if kind != "storescp" else "1.00"
                    # CPU per instance, and as a multiple of storescp's (the 2-core goal: <= 3x)
                    per_inst = r["cpu"] / len(files) * 1e3
                    peer_cpu = results["storescp"]["cpu"]
                    times = f"{r['cpu'] / peer_cpu:.1f}" if peer_cpu >= 0.01 else "-"  # too short to tell
                    print(
                        f"{label:<13}{parallel:>6} {name:<16}{r['ips']:>9.1f}{r['mbps']:>9.1f}"
                        f"{r['cpu']:>8.2f}{r['cpu_per_gb']:>10.1f}{per_inst:>9.2f}{ratio:>12}{times:>8}"
                    )
        if args.bare:
            size = Path(sample_file("CT_small.dcm")).stat().st_size
            for pdu in (16384, 4 * 2**20):
                ms = min(minimal_dul_cpu(1000, pdu) for _ in range(3))
                print(
                    f"minimal Python DUL/DIMSE receiver (no filing), PDU {pdu // 1024} kB: "
                    f"{ms:.3f} ms CPU per ~40 kB instance = {ms / 1e3 / (size / 1e9):.1f} CPU s/GB"
                )


if __name__ == "__main__":
    main()
