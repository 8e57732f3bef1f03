"""Deterministic UIDs under the organisation root, and the device UIDs of the node and its models.

A job that is retried must re-send the same SOP Instance UIDs (a PACS then stores the object once
instead of twice), and different content must never share a UID. So every output UID is a hash of

- the job's ``uid_seed`` (its key: model id, level, series/study UID),
- the model's version and the SHA-256 of its ONNX file (a re-analysis after a model upgrade makes
  new objects, not a second version of the old ones),
- the node's identity: UID root, AE title and device UID (another node, or the same node after a
  database reset under a new name, never reuses this node's UIDs; the identity is cluster-wide,
  so the workers of one node agree),

and a few parts that name the object (its kind, the source instance, the label ...). pydicom's
``generate_uid`` with ``entropy_srcs`` does exactly that: ``root`` + the decimal SHA-512 of the
sources, cut to 64 characters.
"""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

from node.outputs import OutputError
from node.types import AlgorithmIdentity, AnalysisResult, OutputIdentity

_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
#: The longest root that still leaves room for a unique suffix (pydicom wants <= 54 characters;
#: the settings already cap it at 40).
_MAX_ROOT = 54


def _check_root(root: str) -> str:
    if not _ROOT.match(root) or len(root) > _MAX_ROOT:
        raise OutputError(
            f"uid_root must be a dotted numeric UID prefix ending with '.' and at most "
            f"{_MAX_ROOT} characters (found {root!r})"
        )
    return root


def make_uid(root: str, *parts: object) -> str:
    """A UID under ``root`` determined by ``parts`` (each converted with ``str``)."""
    return str(generate_uid(prefix=_check_root(root), entropy_srcs=[str(p) for p in parts]))


def content_key(identity: OutputIdentity, result: AnalysisResult) -> tuple[str, ...]:
    """What determines a result's output UIDs: job key, model id, version and file hash, and the
    node (UID root, AE title, device UID). Raises :class:`OutputError` when the job key or the
    model's SHA-256 is missing (UIDs would then not tell different content apart)."""
    algorithm = result.algorithm
    if not result.uid_seed:
        raise OutputError("uid_seed is empty: output UIDs would not be unique per job")
    if not algorithm.sha256:
        raise OutputError(
            f"model {algorithm.model_id!r} has no sha256: output UIDs would not tell models apart"
        )
    return (
        "job",
        result.uid_seed,
        "model",
        algorithm.model_id,
        algorithm.version,
        algorithm.sha256.lower(),
        "node",
        identity.uid_root,
        identity.device_name,
        identity.device_uid,
    )


def output_uid(identity: OutputIdentity, result: AnalysisResult, *parts: object) -> str:
    """A deterministic UID for one output object (series, instance, tracking UID, ...) of ``result``.

    The UID hashes :func:`content_key` (job key, model version and SHA-256, node identity) and
    ``parts``, which name the object, e.g. ``("sr", "series")`` or ``("sc", sop_instance_uid,
    frame, label)``. The same arguments always give the same UID; a different job, model version,
    model file, node or part gives a different one.
    """
    return make_uid(identity.uid_root, "pacs-node output", *content_key(identity, result), "object", *parts)


def node_device_uid(uid_root: str, ae_title: str) -> str:
    """The node's own Device UID (device observer of its SRs, the KOS's and SCs' Device UID),
    stable for a root and AE title (``node.app.output_identity``)."""
    return str(generate_uid(prefix=_check_root(uid_root), entropy_srcs=["pacs-node device", ae_title]))


def algorithm_device_uid(identity: OutputIdentity, algorithm: AlgorithmIdentity) -> str:
    """The Device UID of a model: derived from the ONNX file's SHA-256, so it changes whenever
    the model file changes (and only then)."""
    if not algorithm.sha256:
        raise OutputError(f"model {algorithm.model_id!r} has no sha256: cannot derive its device UID")
    return make_uid(identity.uid_root, "pacs-node algorithm", algorithm.sha256.lower())
