"""The calling-AE allow-list with source addresses: entries, and rejections logged and counted."""

from __future__ import annotations

import logging

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.allowlist import AllowList, parse_allow_entry
from node.errors import ConfigError
from node.settings import load_settings


def test_entries_parse_and_match() -> None:
    rules = AllowList.parse(["PACS", "CT1@10.0.0.5", "MR1@10.1.0.0/16", "*@192.168.7.0/24", "WS@fd00::/8"])
    assert rules.allows("PACS", "203.0.113.9")
    assert rules.allows("CT1", "10.0.0.5") and not rules.allows("CT1", "10.0.0.6")
    assert rules.allows("MR1", "10.1.200.3") and not rules.allows("MR1", "10.2.0.1")
    assert rules.allows("ANYONE", "192.168.7.40") and not rules.allows("ANYONE", "192.168.8.1")
    assert rules.allows("CT1", "::ffff:10.0.0.5")  # IPv4-mapped IPv6 peer
    assert rules.allows("WS", "fd00::1") and not rules.allows("WS", "10.0.0.5")
    assert not rules.allows("CT2", "10.0.0.5")
    assert AllowList.parse([]).allows("WHOEVER", "198.51.100.1")
    assert parse_allow_entry("odd@name").ae_title == "odd@name"  # not an address: a plain AE title
    with pytest.raises(ValueError, match="leave the allow-list empty"):
        parse_allow_entry("*")
    with pytest.raises(ValueError, match="no AE title"):
        parse_allow_entry("@10.0.0.1")


def test_bad_entries_are_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="allowed_calling_aets"):
        load_settings(None, dicom={"allowed_calling_aets": ["MUCH_TOO_LONG_AE_TITLE@10.0.0.1"]})
    settings = load_settings(None, dicom={"allowed_calling_aets": [" CT1@10.0.0.0/8 "]})
    assert settings.dicom.allowed_calling_aets == ["CT1@10.0.0.0/8"]


def _associates(port: int, calling: str, source: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", bind_address=(source, 0))
    ok = bool(assoc.is_established)
    if ok:
        assoc.release()
    return ok


def test_addresses_are_pinned_and_rejections_logged_and_counted(make_node, caplog) -> None:
    allowed = ["PINNED@127.0.0.1", "NET@127.0.0.0/31", "ROAMING"]
    node = make_node(dicom={"allowed_calling_aets": allowed})
    port = node.scp.port
    with caplog.at_level(logging.INFO, logger="node"):
        assert _associates(port, "PINNED", "127.0.0.1")
        assert not _associates(port, "PINNED", "127.0.0.2")
        assert _associates(port, "NET", "127.0.0.1")
        assert not _associates(port, "NET", "127.0.0.2")
        assert _associates(port, "ROAMING", "127.0.0.2")
        assert not _associates(port, "STRANGER", "127.0.0.1")
    rejections = [
        r.getMessage() for r in caplog.records if "not in dicom.allowed_calling_aets" in r.getMessage()
    ]
    assert len(rejections) == 3
    assert any("PINNED at 127.0.0.2" in m for m in rejections)
    assert any("STRANGER at 127.0.0.1" in m for m in rejections)

    value = node.metrics.registry.get_sample_value
    name = "pacsnode_associations_total"
    assert value(name, {"calling_ae": "PINNED", "outcome": "rejected_not_allowed"}) == 1
    assert value(name, {"calling_ae": "NET", "outcome": "rejected_not_allowed"}) == 1
    assert value(name, {"calling_ae": "(unlisted)", "outcome": "rejected_not_allowed"}) == 1
    assert value(name, {"calling_ae": "PINNED", "outcome": "accepted"}) == 1
    assert value(name, {"calling_ae": "ROAMING", "outcome": "accepted"}) == 1
