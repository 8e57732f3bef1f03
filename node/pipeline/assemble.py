"""Completion detection: a series (or, with study grouping, a study) is complete once no instance
of it arrived for a quiet period. State lives in the database, so timers survive a restart, but the
time the node was down does not count as quiet: a sender cut off mid-series by a crash or restart
could not send meanwhile, so after a start nothing completes before one full quiet period of
listening has passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from node.settings import AssemblySettings
from node.store import repo


@dataclass(frozen=True, slots=True)
class Completed:
    """What one assembly pass completed."""

    series: list[str]
    studies: list[str]


def assemble(
    session: Session, now: datetime, settings: AssemblySettings, listening_since: datetime | None = None
) -> Completed:
    """Complete what has been quiet long enough at ``now``, counting quiet time only since
    ``listening_since`` (when the node started receiving) if given. The caller commits."""
    quiet = settings.study_quiet_s if settings.group_by == "study" else settings.series_quiet_s
    if listening_since is not None and now - listening_since < timedelta(seconds=quiet):
        return Completed(series=[], studies=[])
    if settings.group_by == "study":
        studies = repo.complete_quiet_studies(session, now, timedelta(seconds=settings.study_quiet_s))
        return Completed(series=[], studies=studies)
    series = repo.complete_quiet_series(session, now, timedelta(seconds=settings.series_quiet_s))
    studies = repo.complete_studies_of_complete_series(session, now)
    return Completed(series=series, studies=studies)
