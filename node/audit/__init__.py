"""The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) sent to an audit record
repository over syslog (RFC 5424; UDP, TCP or TLS with RFC 5425 framing). Off unless
``audit.enabled``; the messages carry patient identifiers and never go to the node's log."""

from node.audit.events import AuditTrail, build_audit

__all__ = ["AuditTrail", "build_audit"]
