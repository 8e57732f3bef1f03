"""Several node processes on one database: who they are, which data folder they see, their
heartbeat. A node whose data folder is not the running nodes' is refused at start: every role
reads the received files (routing, analysis) or the outputs (sending) from the data folder, so
nodes sharing a database must share it (a NAS), or share an object store (storage.object_store:
the storage id is then the store's identity and each node has its own data folder; docs/scale.md)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from node.errors import ConfigError
from node.store.tables import ClusterNode

log = logging.getLogger(__name__)
STORAGE_ID_FILE = ".storage-id"
ROLES = ("all", "receiver", "worker", "sender")


def node_id(configured: str) -> str:
    """This process's node id: the configured one, else the host name."""
    return (configured or socket.gethostname() or "node")[:64]


def storage_id(data_dir: Path, configured: str = "") -> str:
    """The identity of the data folder: the configured one, else the id kept in
    ``data_dir/.storage-id``, made once (atomically: two nodes starting at once on one shared
    folder read the same id)."""
    if configured:
        return configured[:64]
    marker = data_dir / STORAGE_ID_FILE
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".storage-id.{uuid.uuid4().hex}"
    tmp.write_text(uuid.uuid4().hex + "\n")
    try:
        os.link(tmp, marker)  # fails when another node made it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return marker.read_text().strip()


def register(
    engine: Engine, node: str, storage: str, role: str, version: str, now: datetime, lease_s: float
) -> None:
    """Record this node as running; raise ConfigError when a running node (heartbeat within three
    leases, not stopped) uses another data folder."""
    alive_since = now - timedelta(seconds=3 * lease_s)
    with Session(engine) as session:
        others = session.exec(
            select(ClusterNode).where(
                ClusterNode.node_id != node,
                ClusterNode.storage_id != storage,
                col(ClusterNode.stopped_at).is_(None),
                col(ClusterNode.heartbeat_at) >= alive_since,
            )
        ).all()
        if others:
            names = ", ".join(sorted(o.node_id for o in others))
            raise ConfigError(
                f"node {node!r} sees another data folder or object store than the running node(s) "
                f"{names} on this database (storage id {storage} vs {others[0].storage_id}): nodes "
                "sharing a database must share storage.data_dir (a NAS mount) or one "
                "storage.object_store; see docs/scale.md"
            )
        row = session.get(ClusterNode, node)
        if (
            row is not None
            and row.stopped_at is None
            and row.heartbeat_at >= now - timedelta(seconds=lease_s)
        ):
            log.warning(
                "node id %s renewed its heartbeat %.0f s ago and recorded no stop: this node was killed "
                "a moment ago, or another process runs with the same cluster.node_id (give each its own)",
                node,
                (now - row.heartbeat_at).total_seconds(),
            )
        row = row or ClusterNode(node_id=node, storage_id=storage, started_at=now, heartbeat_at=now)
        row.storage_id, row.role, row.hostname, row.version = (
            storage,
            role,
            socket.gethostname()[:255],
            version[:32],
        )
        row.started_at = row.heartbeat_at = now
        row.stopped_at = None
        session.add(row)
        session.commit()
    log.info("node %s (role %s) registered on storage %s", node, role, storage)


def heartbeat(session: Session, node: str, now: datetime) -> None:
    """Record that ``node`` is alive. The caller commits."""
    session.exec(update(ClusterNode).where(col(ClusterNode.node_id) == node).values(heartbeat_at=now))


def stopped(engine: Engine, node: str, now: datetime) -> None:
    """Record a clean stop (the node no longer counts as running)."""
    with Session(engine) as session:
        session.exec(update(ClusterNode).where(col(ClusterNode.node_id) == node).values(stopped_at=now))
        session.commit()
