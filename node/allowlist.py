"""Who may open an association: calling AE titles, optionally pinned to source addresses (the
grammar of ``dicom.allowed_calling_aets``, checked when the settings load, and the matching the
DICOM listeners do; no stage's module, so that the settings import none).

Entries (``dicom.allowed_calling_aets``):

- ``MODALITY1``: that calling AE title from any address;
- ``MODALITY1@10.0.0.5``: that AE title from that address only (IPv4 or IPv6);
- ``MODALITY1@10.0.0.0/24``: that AE title from that network;
- ``*@10.0.0.0/24``: any AE title from that network.

An association is accepted when any entry matches; an empty list accepts everyone. The part after
the last ``@`` is read as an address or network only when it parses as one, so an AE title that
itself contains ``@`` (the default character repertoire allows it) still works as a plain entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_AE = "*"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list entry: an AE title (None: any) and a network (None: any address)."""

    ae_title: str | None
    network: IPNetwork | None

    def matches(self, ae_title: str, address: str) -> bool:
        """True when ``ae_title`` calling from ``address`` fits this entry."""
        if self.ae_title is not None and self.ae_title != ae_title.strip():
            return False
        if self.network is None:
            return True
        ip = _address(address)
        return ip is not None and ip.version == self.network.version and ip in self.network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_allow_entry(entry: str) -> AllowRule:
    """Parse one entry (see the module docstring); ValueError says what is wrong."""
    text = entry.strip()
    if not text:
        raise ValueError("an allow-list entry is empty")
    ae_part, sep, where = text.rpartition("@")
    if sep:
        try:
            network: IPNetwork | None = ipaddress.ip_network(where.strip(), strict=False)
        except ValueError:
            network = None
        if network is not None:
            ae = ae_part.strip()
            if not ae:
                raise ValueError(f"allow-list entry {entry!r} has no AE title before '@' (use * for any)")
            return AllowRule(None if ae == ANY_AE else ae, network)
    if text == ANY_AE:
        raise ValueError("a bare '*' would accept everyone; leave the allow-list empty instead")
    return AllowRule(text, None)


@dataclass(frozen=True, slots=True)
class AllowList:
    """The parsed allow-list; empty accepts every association."""

    rules: tuple[AllowRule, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Parse configuration entries."""
        return cls(tuple(parse_allow_entry(e) for e in entries))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def allows(self, ae_title: str, address: str) -> bool:
        """True when the calling AE title from ``address`` may associate."""
        return not self.rules or any(rule.matches(ae_title, address) for rule in self.rules)

    def knows(self, ae_title: str) -> bool:
        """True when some entry names this AE title (used to bound metric labels)."""
        return any(rule.ae_title == ae_title.strip() for rule in self.rules)
