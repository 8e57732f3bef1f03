"""DICOM TLS: DCMTK echoscu/storescu against the node's listener, and the node's sender against a
DCMTK storescp with TLS, with certificates the test makes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from node.errors import ConfigError
from node.send import OutgoingFile
from node.send.cstore import CStoreDestination
from node.settings import DestinationSettings, load_settings
from tests.helpers import free_port, fresh_copy, need, sample_file, wait_port
from tests.security.certs import Certs


def _tls(certs: Certs, **extra: object) -> dict:
    return {
        "enabled": True,
        "cert_file": str(certs.server_cert),
        "key_file": str(certs.server_key),
        "ca_file": str(certs.ca),
        **extra,
    }


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


def _echo(port: int, *tls: str | Path) -> int:
    return _run(need("echoscu"), "-aet", "MODALITY", "-aec", "PACSNODE", *tls, "127.0.0.1", port).returncode


def test_echo_and_store_need_the_right_ca(make_node, certs: Certs, tmp_path: Path) -> None:
    node = make_node(dicom={"tls": _tls(certs)})
    port = node.scp.port
    assert node.scp.tls_port == port  # TLS only on the main port
    assert _echo(port, "+tla", "+cf", certs.ca) == 0
    assert _echo(port, "+tla") != 0  # the server certificate cannot be verified
    assert _echo(port, "+tla", "+cf", certs.other_ca) != 0  # nor with an unrelated CA
    assert _echo(port) != 0  # no plain TCP on a TLS-only port
    with socket.create_connection(("127.0.0.1", port)):  # a client that connects and says nothing
        time.sleep(0.2)
        assert _echo(port, "+tla", "+cf", certs.ca, "-to", "10") == 0  # does not stall the others
    # a client certificate is optional here, and verified when presented
    assert _echo(port, "+tls", certs.client_key, certs.client_cert, "+cf", certs.ca) == 0

    src = fresh_copy(sample_file("CT_small.dcm"), tmp_path / "in" / "ct.dcm")
    stored = _run(need("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "+tla", "+cf", certs.ca,
                  "127.0.0.1", port, src)  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    refused = _run(need("storescu"), "-aet", "MODALITY", "+tla", "127.0.0.1", port, src)
    assert refused.returncode != 0
    uid = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    assert any(uid in p.name for p in node.spool.root.rglob("*.dcm"))


def test_client_certificate_required_on_a_separate_tls_port(make_node, certs: Certs) -> None:
    tls_port = free_port()
    node = make_node(dicom={"tls": _tls(certs, require_client_cert=True, port=tls_port)})
    assert node.scp.tls_port == tls_port and node.scp.port != tls_port
    assert _echo(node.scp.port) == 0  # plain TCP stays on dicom.port
    assert _echo(tls_port, "+tla", "+cf", certs.ca) != 0  # no client certificate
    assert _echo(tls_port, "+tls", certs.client_key, certs.client_cert, "+cf", certs.ca) == 0
    assert _echo(node.scp.port, "+tla", "+cf", certs.ca) != 0  # the plain port does not speak TLS


def test_tls_settings_are_checked(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_settings(None, dicom={"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match="ca_file"):
        load_settings(None, dicom={"tls": {**_tls(certs, ca_file=None), "require_client_cert": True}})
    dest = DestinationSettings(
        name="pacs", ae_title="DEST", host="127.0.0.1", port=104,
        tls={"enabled": True, "ca_file": str(tmp_path / "missing.pem")},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"destinations\[pacs\]\.tls\.ca_file"):
        CStoreDestination(dest, calling_aet="PACSNODE")


class _TlsStoreSCP:
    """DCMTK storescp with TLS, requiring a client certificate from the test CA."""

    def __init__(self, folder: Path, port: int, certs: Certs) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        cmd = [
            need("storescp"),
            "--aetitle",
            "DEST",
            "--output-directory",
            str(folder),
            "+tls",
            str(certs.server_key),
            str(certs.server_cert),
            "+cf",
            str(certs.ca),
            str(port),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, 20)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_sender_delivers_to_a_tls_storescp(tmp_path: Path, certs: Certs) -> None:
    port = free_port()
    scp = _TlsStoreSCP(tmp_path / "received", port, certs)
    try:
        src = fresh_copy(sample_file("CT_small.dcm"), tmp_path / "out" / "ct.dcm")
        meta = pydicom.dcmread(src, stop_before_pixels=True).file_meta
        item = OutgoingFile(src, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))

        def send(**tls: object) -> bool:
            settings = DestinationSettings(
                name="pacs", ae_title="DEST", host="127.0.0.1", port=port, tls={"enabled": True, **tls}
            )
            dest = CStoreDestination(settings, calling_aet="PACSNODE", timeout_s=10)
            return dest.send([item])[0].ok

        client = {"cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
        assert send(ca_file=str(certs.ca), **client)
        received = list((tmp_path / "received").iterdir())
        assert len(received) == 1
        assert pydicom.dcmread(received[0]).SOPInstanceUID == meta.MediaStorageSOPInstanceUID
        assert not send(ca_file=str(certs.other_ca), **client)  # peer not trusted
        assert not send(ca_file=str(certs.ca))  # the peer requires a client certificate
        assert not send(ca_file=str(certs.ca), server_name="pacs.example.org", **client)  # wrong name
    finally:
        scp.stop()
