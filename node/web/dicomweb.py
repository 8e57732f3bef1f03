"""DICOMweb in: STOW-RS (PS3.18 10.5), ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

The request is ``multipart/related; type="application/dicom"``, one PS3.10 file per part. The body
is streamed, never held whole in memory: each part goes to an unnamed temporary file beside the
spool (gone with the process, whatever happens) while it arrives, with ``web.max_stow_mb`` counted
on the way (413 above it; the guard refuses a larger declared Content-Length before reading).
Then every part is filed by the C-STORE path itself (:meth:`node.dicom.ingest.InstanceFiler.
file_part10`): the same budget and SOP class checks, the same durable write and group commit,
the same duplicate policy (``storage.duplicates``), so an instance is listed as stored only once
it is on disk and its row is committed, and it is then assembled, routed and analysed as any
received over C-STORE.

The answer is a Store Instances Response (``application/dicom+json``): ReferencedSOPSequence
(0008,1199) for the instances stored, FailedSOPSequence (0008,1198) with FailureReason
(0008,1197) for the others, using the C-STORE statuses (A700 out of resources, A900 the data set
does not match, C000 cannot understand, 0122 SOP class not supported, 0111 duplicate refused, and
C122 transfer syntax not supported). 200: all stored, 202: some failed, 409: all failed. An
instance of another study than the one the path names fails with A900. 400: a malformed request
(the detail names what), 406: an Accept the node cannot answer, 413: too large, 415: not
multipart/related of application/dicom, 503: the spool's disk is below its watermark.

Who may store: when ``web.tokens`` is configured, a token of the admin role, presented as
``Authorization: Bearer <token>`` or as the password of HTTP Basic (what PACS DICOMweb clients
such as Orthanc's can be configured with). The sign-in cookie is not accepted here: STOW is for
API clients, and the guard's Origin check still refuses a browser's cross-site POST. The
instances are recorded with the source ``STOW-RS`` in place of a calling AE title.

With ``audit.enabled`` each request sends, per study, a DICOM Instances Transferred audit message
(:meth:`node.audit.events.AuditTrail.stow_received`; docs/audit.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from node.audit.events import StowStudy
from node.dicom import status
from node.dicom.ingest import Part10Instance, Part10Refused
from node.dicom.scp import TRANSFER_SYNTAXES
from node.dicom.spool import SpoolFullError
from node.errors import StoreError
from node.web import auth

if TYPE_CHECKING:
    from node.web.deps import WebNode

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
STUDIES_PATH = f"{PREFIX}/studies"
#: what the instances are recorded as coming from (in place of a calling AE title, at most 16)
SOURCE = "STOW-RS"
DICOM_JSON = "application/dicom+json"
_ACCEPTABLE = {"*/*", "application/*", DICOM_JSON, "application/json"}
#: parts filed at the same time (each holds its instance in memory while it is filed)
CONCURRENT_PARTS = 4
#: part headers: how many and how long (a part has Content-Type, maybe Content-Length/-ID/-Location)
MAX_PART_HEADERS = 16
MAX_PART_HEADER_BYTES = 8192
MIB = 2**20


def stow_body_limit(node: WebNode) -> int:
    """The most bytes a STOW-RS request body may have (``web.max_stow_mb``)."""
    return int(node.settings.web.max_stow_mb * MIB)


def is_stow_path(path: str) -> bool:
    """True for the STOW-RS routes (their body limit is ``web.max_stow_mb``)."""
    return path == STUDIES_PATH or (
        path.startswith(STUDIES_PATH + "/") and "/" not in path[len(STUDIES_PATH) + 1 :]
    )


class BadRequest(Exception):
    """The request cannot be read; ``code`` is the HTTP status, the message names why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Part:
    """One body part: its headers and the temporary file its bytes went to."""

    file: IO[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0


class _BodyReader:
    """Feeds the body to python-multipart's streaming parser; each part's bytes go to its own
    unnamed temporary file in ``folder``."""

    def __init__(self, boundary: bytes, folder: str) -> None:
        self.folder = folder
        self.parts: list[_Part] = []
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._begin,
                    "on_part_data": self._data,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_end": self._end,
                },
                max_header_count=MAX_PART_HEADERS,
                max_header_size=MAX_PART_HEADER_BYTES,
            )
        except FormParserError as exc:
            raise BadRequest(400, f"the multipart boundary cannot be used: {exc}") from exc

    def _begin(self) -> None:
        # unnamed (O_TMPFILE): nothing is left behind, whatever stops the process; closed in close()
        held = tempfile.TemporaryFile(dir=self.folder, prefix=f"{os.getpid()}-stow-")  # noqa: SIM115
        self.parts.append(_Part(held))

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.file.write(data[start:end])
        part.size += end - start

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        """Parse one chunk of the body (raises BadRequest when it is not multipart)."""
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(400, f"the multipart body is malformed: {exc}") from exc

    def finish(self) -> None:
        """Check that the body ended where multipart says it ends."""
        if not self.ended:
            raise BadRequest(400, "the multipart body ends before its closing boundary (truncated?)")
        if not self.parts:
            raise BadRequest(400, "the multipart body has no parts")

    def close(self) -> None:
        """Drop the temporary files."""
        for part in self.parts:
            part.file.close()


def _content_type(request: Request) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` request; 415 for another
    media type, 400 without a boundary."""
    header = request.headers.get("content-type", "")
    if not header:
        raise BadRequest(415, 'no Content-Type: send multipart/related; type="application/dicom"')
    media, params = parse_options_header(header)
    if media.lower() != b"multipart/related":
        shown = media.decode("latin-1")[:80]
        raise BadRequest(415, f'Content-Type {shown!r} is not multipart/related; type="application/dicom"')
    kind = params.get(b"type", b"application/dicom").decode("latin-1").strip().lower()
    if kind != "application/dicom":
        raise BadRequest(
            415, f"multipart/related of {kind[:80]!r} is not supported: only application/dicom (PS3.10 files)"
        )
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise BadRequest(400, "the multipart/related Content-Type has no boundary parameter")
    # RFC 2046 says at most 70 characters; Orthanc's DICOMweb client sends longer ones, so only
    # the parser's own limit applies
    return boundary


def _check_accept(request: Request) -> None:
    """406 unless the client takes application/dicom+json (or anything)."""
    header = request.headers.get("accept", "").strip()
    if not header:
        return
    for item in header.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in _ACCEPTABLE:
            return
    raise BadRequest(
        406, f"the Store Instances Response is {DICOM_JSON}; the Accept header {header[:100]!r} excludes it"
    )


def _token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or the password of HTTP Basic."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def _authorize(node: WebNode, request: Request) -> None:
    """401/403 unless the request may store (see the module docstring)."""
    web = node.settings.web
    if not web.tokens:
        return
    token = _token(request)
    principal = auth.identify(web, token)
    if principal is None:
        detail = (
            "a bearer token (or HTTP Basic password) is required" if not token else "the token is not valid"
        )
        raise HTTPException(
            401, detail, headers={"WWW-Authenticate": 'Bearer, Basic realm="pacs-node", charset="UTF-8"'}
        )
    if not principal.can("admin"):
        raise HTTPException(403, f"storing needs the admin role; the token has {principal.role}")
    request.state.principal = principal


@dataclass(frozen=True)
class _Outcome:
    """What happened to one part."""

    instance: Part10Instance
    code: int  # 0 stored, else the failure reason
    new: bool = False
    size: int = 0


def _file_part(node: WebNode, part: _Part, study_uid: str | None) -> _Outcome:
    """File one part through the C-STORE path; never raises for the part's content."""
    kind = part.headers.get("content-type")
    if kind is not None:
        media = parse_options_header(kind)[0].decode("latin-1").lower()
        if media != "application/dicom":
            log.warning("STOW-RS part of type %r refused: only application/dicom", media[:80])
            return _Outcome(Part10Instance(), status.CANNOT_UNDERSTAND)
    part.file.seek(0)
    data = part.file.read()
    part.file.close()  # its disk space goes back now
    try:
        instance, new = node.scp.filer.file_part10(
            data, SOURCE, TRANSFER_SYNTAXES, node.scp.budget, study_uid=study_uid
        )
    except Part10Refused as exc:
        log.warning("STOW-RS instance refused with %s: %s", status.name(exc.status), exc)
        return _Outcome(exc.instance, exc.status)
    except Exception as exc:  # a bug of ours must cost one instance, not the request
        log.exception("STOW-RS: unexpected %s while filing", type(exc).__name__)
        return _Outcome(Part10Instance(), status.PROCESSING_FAILURE)
    if not new:
        log.info("duplicate instance received over STOW-RS; already stored")
    return _Outcome(instance, 0, new, len(data))


def _reference(outcome: _Outcome) -> Dataset:
    item = Dataset()
    if outcome.instance.sop_class_uid:
        item.ReferencedSOPClassUID = outcome.instance.sop_class_uid[:64]
    if outcome.instance.sop_instance_uid:
        item.ReferencedSOPInstanceUID = outcome.instance.sop_instance_uid[:64]
    return item


def store_response(outcomes: list[_Outcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the DICOM JSON Store Instances Response for the parts' outcomes."""
    response = Dataset()
    stored = [o for o in outcomes if o.code == 0]
    failed = [o for o in outcomes if o.code != 0]
    if stored:
        response.ReferencedSOPSequence = [_reference(o) for o in stored]
    if failed:
        items = []
        for o in failed:
            item = _reference(o)
            item.FailureReason = o.code
            items.append(item)
        response.FailedSOPSequence = items
    code = 200 if not failed else 409 if not stored else 202
    return code, response.to_json_dict()


def _check_room(node: WebNode, request: Request) -> None:
    """503 when buffering the body would take the spool's disk below its watermark
    (``storage.min_free_mb``): every instance would be refused as out of resources anyway."""
    declared = request.headers.get("content-length", "").strip()
    try:
        node.spool.check_space(int(declared) if declared.isdigit() else 0)
    except SpoolFullError as exc:
        raise BadRequest(503, f"the node is out of disk space: {exc}") from exc
    except OSError as exc:
        raise BadRequest(503, f"the node cannot check its disk space: {exc.strerror}") from exc


async def _read_body(request: Request, reader: _BodyReader, limit: int) -> None:
    """Stream the body into ``reader``, 413 once it passes ``limit`` bytes."""
    loop = asyncio.get_running_loop()
    total = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, f"the request body is over web.max_stow_mb ({limit} bytes)")
        await loop.run_in_executor(None, reader.write, chunk)  # disk writes off the event loop
    reader.finish()


async def stow(node: WebNode, request: Request, study_uid: str | None) -> Response:
    """Handle one STOW-RS request (see the module docstring)."""
    try:
        response = await _stow(node, request, study_uid)
    except BadRequest as exc:
        log.info("STOW-RS request refused (%d): %s", exc.code, exc.message)
        response = JSONResponse({"detail": exc.message}, status_code=exc.code)
    except HTTPException as exc:
        response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    node.metrics.stow_request(response.status_code)
    return response


async def _stow(node: WebNode, request: Request, study_uid: str | None) -> Response:
    _authorize(node, request)
    _check_accept(request)
    boundary = _content_type(request)
    if study_uid is not None:
        study_uid = study_uid.strip()
        if not study_uid or len(study_uid) > 64:
            raise BadRequest(400, "the study UID in the path is empty or longer than 64 characters")
    node.spool.tmp_dir.mkdir(parents=True, exist_ok=True)
    _check_room(node, request)
    reader = _BodyReader(boundary, str(node.spool.tmp_dir))
    try:
        try:
            await _read_body(request, reader, stow_body_limit(node))
        except ClientDisconnect as exc:
            raise BadRequest(400, "the client closed the connection before the body ended") from exc
        except OSError as exc:
            log.error("STOW-RS body could not be buffered: %s", exc.strerror)
            raise BadRequest(503, f"the node cannot buffer the request body: {exc.strerror}") from exc
        limiter = asyncio.Semaphore(CONCURRENT_PARTS)
        loop = asyncio.get_running_loop()

        async def one(part: _Part) -> _Outcome:
            async with limiter:
                return await loop.run_in_executor(None, _file_part, node, part, study_uid)

        outcomes = await asyncio.gather(*(one(p) for p in reader.parts))
    finally:
        reader.close()
    for o in outcomes:
        if o.code == 0:
            node.metrics.stored(SOURCE, o.size, o.new, stow=True)
        else:
            node.metrics.refused(SOURCE, o.code, stow=True)
    _audit(node, request, outcomes)
    code, body = store_response(outcomes)
    log.info(
        "STOW-RS: %d of %d instances stored (%d new)",
        sum(o.code == 0 for o in outcomes),
        len(outcomes),
        sum(o.new for o in outcomes),
    )
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


def _sample(node: WebNode, sop_instance_uid: str) -> Callable[[], Path | None]:
    """Where the stored file of the instance is, looked up when the audit message is built."""

    def find() -> Path | None:
        try:
            relative = node.scp.filer.committer.recorded_path(sop_instance_uid)
        except StoreError:
            return None
        return node.spool.root / relative if relative else None

    return find


def _audit(node: WebNode, request: Request, outcomes: list[_Outcome]) -> None:
    """Instances received: one DICOM Instances Transferred audit message per study of the request
    (parts whose study could not be read are counted in the log only)."""
    if not node.audit.enabled:
        return
    studies: dict[str, StowStudy] = {}
    for o in outcomes:
        if not o.instance.study_uid:
            continue
        study = studies.setdefault(o.instance.study_uid, StowStudy())
        if o.code == 0:
            study.stored += 1
            study.sop_classes[o.instance.sop_class_uid] += 1
            if study.sample is None:
                study.sample = _sample(node, o.instance.sop_instance_uid)
        else:
            study.refused += 1
    principal = getattr(request.state, "principal", None)
    user = principal.name if principal is not None else SOURCE
    node.audit.stow_received(user, request.client.host if request.client else "", studies)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (Store Instances Response, application/dicom+json)"},
    202: {"description": "some instances stored, some failed (FailedSOPSequence names them)"},
    400: {"description": "malformed request: the detail names what"},
    401: {"description": "no token, or a token that is not valid"},
    403: {"description": "the token's role is not admin, or another site's page"},
    406: {"description": "the client does not accept application/dicom+json"},
    409: {"description": "no instance stored (FailedSOPSequence says why for each)"},
    413: {"description": "the body is larger than web.max_stow_mb"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
    503: {"description": "the node's disk is below storage.min_free_mb"},
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
    }
}


def router(node: WebNode) -> APIRouter:
    """The STOW-RS routes; bodies limited to ``web.max_stow_mb`` while they are read."""
    api = APIRouter(prefix=PREFIX, tags=["dicomweb"], max_body_size=stow_body_limit(node))

    @api.post("/studies", responses=_RESPONSES, openapi_extra=_BODY, response_class=JSONResponse)
    async def store_instances(request: Request) -> Response:
        """STOW-RS: store the instances of the body (any studies)."""
        return await stow(node, request, None)

    @api.post("/studies/{study}", responses=_RESPONSES, openapi_extra=_BODY, response_class=JSONResponse)
    async def store_study_instances(study: str, request: Request) -> Response:
        """STOW-RS: store the instances of the body, all of the study ``study`` (others fail, A900)."""
        return await stow(node, request, study)

    return api
