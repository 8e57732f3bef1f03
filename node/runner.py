"""The runner: background loops that move work along. For now, assembly of complete series; the
completed series are handed to routing ("complete, not yet routed") once routing exists.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine
from sqlmodel import Session

from node.pipeline.assemble import assemble
from node.settings import AssemblySettings
from node.store.tables import utcnow

log = logging.getLogger(__name__)


class Runner:
    """Runs assembly every poll interval until stopped."""

    def __init__(self, engine: Engine, assembly: AssemblySettings) -> None:
        self._engine = engine
        self._assembly = assembly
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background loop (it first completes what was quiet during a restart)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to finish and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def tick(self) -> None:
        """One pass of every stage the runner drives."""
        with Session(self._engine) as session:
            done = assemble(session, utcnow(), self._assembly)
            session.commit()
        if done.series or done.studies:
            log.info(
                "assembly: %d series and %d studies complete, not yet routed",
                len(done.series),
                len(done.studies),
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive a transient database error; it is logged
                log.exception("runner pass failed; retrying")
            self._stop.wait(self._assembly.poll_interval_s)
