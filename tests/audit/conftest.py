"""A real rsyslog (Debian's rsyslogd) on loopback as the audit record repository, and the DICOM
audit message schema (PS3.15 A.5.1) for lxml's RELAX NG validator."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port
from tests.security.certs import Certs, make_certs

SCHEMA = Path(__file__).with_name("dicom-audit.rng")
FIELDS = ("input", "pri", "version", "hostname", "app_name", "procid", "msgid", "sd", "msg")
# one line per message: the parsed RFC 5424 header fields and the MSG (the XML has no newline)
TEMPLATE = "\\t".join(f"%{p}%" for p in ("inputname", "pri", "protocol-version", "hostname", "app-name",
                                            "procid", "msgid", "structured-data", "msg")) + "\\n"  # fmt: skip


def validator() -> object:
    """lxml's RelaxNG of the DICOM audit message schema."""
    from lxml import etree

    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def assert_valid(xml: bytes) -> object:
    """Parse ``xml`` and assert that it validates against the schema; return the root element."""
    from lxml import etree

    root = etree.fromstring(xml)
    schema = validator()
    assert schema.validate(root), schema.error_log  # type: ignore[attr-defined]
    return root


@dataclass
class Received:
    """One message as rsyslog parsed it."""

    input: str
    pri: str
    version: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: str
    msg: str

    @property
    def xml(self) -> bytes:
        """The MSG without its byte order mark."""
        return self.msg.removeprefix("\ufeff").encode()


@dataclass
class Rsyslog:
    """A running rsyslogd; ``udp``/``tcp``/``tls`` are its ports (0: not listening)."""

    proc: subprocess.Popen
    out: Path
    udp: int = 0
    tcp: int = 0
    tls: int = 0
    certs: Certs | None = None

    def messages(self) -> list[Received]:
        """Every message written so far."""
        if not self.out.exists():
            return []
        lines = [line for line in self.out.read_text(encoding="utf-8").split("\n") if line]
        return [Received(*line.split("\t", len(FIELDS) - 1)) for line in lines]

    def wait(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``count`` messages were written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"rsyslog wrote {len(self.messages())} messages, expected {count}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _wait_listening(proc: subprocess.Popen, ports: list[int], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rsyslogd exited: {log.read_text()}")
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"rsyslogd not listening: {log.read_text()}")


def start_rsyslog(folder: Path, tls: bool = False) -> Rsyslog:
    """rsyslogd -n with its own config: UDP and TCP (imudp, imtcp) or one TLS input (imtcp with
    the gtls driver, client certificates required), every message to one file."""
    fallback = Path("/usr/sbin/rsyslogd")
    binary = shutil.which("rsyslogd") or (str(fallback) if fallback.exists() else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("rsyslogd is not installed; scripts/system-deps.sh installs it")
        pytest.skip("rsyslogd is not installed (Debian: apt-get install rsyslog rsyslog-gnutls)")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "received.log"
    certs = None
    lines = []
    if tls:
        if not Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists() and not list(
            Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")
        ):
            if os.environ.get("CI"):
                pytest.fail("rsyslog-gnutls is not installed; scripts/system-deps.sh installs it")
            pytest.skip("rsyslog-gnutls is not installed (Debian: apt-get install rsyslog-gnutls)")
        certs = make_certs(folder / "certs")
        lines += [
            f'global(workDirectory="{folder}" maxMessageSize="64k" DefaultNetstreamDriver="gtls"',
            f'  DefaultNetstreamDriverCAFile="{certs.ca}"',
            f'  DefaultNetstreamDriverCertFile="{certs.server_cert}"',
            f'  DefaultNetstreamDriverKeyFile="{certs.server_key}")',
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
            'StreamDriver.AuthMode="x509/certvalid")',
        ]
    else:
        lines += [
            f'global(workDirectory="{folder}" maxMessageSize="64k")',
            'module(load="imudp")',
            'module(load="imtcp")',
        ]
    lines += [
        f'template(name="audit" type="string" string="{TEMPLATE}")',
        f'ruleset(name="audit") {{ action(type="omfile" file="{out}" template="audit") }}',
    ]
    rs = Rsyslog(proc=None, out=out, certs=certs)  # type: ignore[arg-type]
    if tls:
        rs.tls = free_port()
        lines.append(f'input(type="imtcp" address="127.0.0.1" port="{rs.tls}" ruleset="audit")')
    else:
        rs.udp, rs.tcp = free_port(), free_port()
        lines.append(f'input(type="imudp" address="127.0.0.1" port="{rs.udp}" ruleset="audit")')
        lines.append(f'input(type="imtcp" address="127.0.0.1" port="{rs.tcp}" ruleset="audit")')
    config = folder / "rsyslog.conf"
    config.write_text("\n".join(lines) + "\n")
    log = folder / "rsyslogd.log"
    with open(log, "wb") as fh:
        rs.proc = subprocess.Popen(
            [binary, "-n", "-f", str(config), "-i", str(folder / "rsyslogd.pid")], stdout=fh, stderr=fh
        )
    _wait_listening(rs.proc, [rs.tls] if tls else [rs.tcp], log)
    return rs


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """rsyslogd on loopback, UDP and TCP."""
    rs = start_rsyslog(tmp_path / "rsyslog")
    yield rs
    rs.stop()


@pytest.fixture
def rsyslog_tls(tmp_path: Path) -> Iterator[Rsyslog]:
    """rsyslogd on loopback, TLS (RFC 5425) with client certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    rs = start_rsyslog(tmp_path / "rsyslog-tls", tls=True)
    yield rs
    rs.stop()
