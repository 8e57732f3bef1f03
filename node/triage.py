"""Triage policy: what makes a study urgent and its suspicion score, and the order studies are
read in. Pure functions of the jobs' results and the stored priorities; the store reads their
inputs and records their outcome (``node.store.repo.refresh_study_triage``, ``worklist``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

from node.store.tables import Job, Priority


def study_triage(
    jobs: Sequence[Job], triage_labels: Mapping[str, Collection[str]]
) -> tuple[str | None, float | None]:
    """Priority and suspicion score from a study's finished jobs.

    urgent: a finding raised triage in any job (a label the manifest flags for triage, above its
    threshold); routine: analysed, none urgent; None when no job has a result yet. The score is
    the highest probability among the labels flagged for triage (``triage_labels``: model id ->
    label names; None when the models flag none).
    """
    done = [(j.model_id, r) for j in jobs if (r := j.recorded_result()) is not None]
    if not done:
        return None, None
    findings = [(model, f) for model, r in done for f in r.findings]
    urgent = any(f.triage for _, f in findings)
    flagged = [f.probability for m, f in findings if f.label in triage_labels.get(m, ())]
    return (Priority.URGENT if urgent else Priority.ROUTINE), max(flagged, default=None)


def worklist_order(items: Sequence[tuple[str, float | None, datetime]]) -> list[int]:
    """Order (priority, score, arrival) tuples for reading; return indexes into ``items``.

    Urgent studies come first, by suspicion score (highest first) then arrival (oldest first).
    Every other study (routine, pending, failed, not analysed) keeps plain arrival order, oldest first:
    as cleared triage products do, the AI only ever moves suspected positives *up*; a negative or
    missing result never moves a study below where arrival order puts it. So for a non-urgent
    study, every study above it either arrived earlier or was flagged urgent.
    """

    def key(i: int) -> tuple[int, float, datetime, int]:
        priority, score, arrival = items[i]
        if priority == Priority.URGENT:
            return 0, -(score or 0.0), arrival, i
        return 1, 0.0, arrival, i

    return sorted(range(len(items)), key=key)
