"""STOW-RS destination: the DICOM objects POSTed to a DICOMweb server with ``dicomweb-client``.

One request per batch (multipart/related; type="application/dicom"); the answer's
ReferencedSOPSequence / FailedSOPSequence say per instance whether the server has it. Retries are
the outbox's (dicomweb-client's own retrying is turned off), so a batch is never sent twice in one
pass and an instance the server already holds is simply stored again under the same UID.
"""

from __future__ import annotations

import logging
import time

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.dicom import status
from node.prometheus import NodeMetrics
from node.send import Delivery, OutgoingFile
from node.send.http import describe_status, is_permanent, session_for
from node.settings import DestinationSettings

log = logging.getLogger(__name__)
#: Failure Reasons (PS3.18 Table I.2-1 / PS3.4 C-STORE statuses) that a resend cannot cure.
#: 0x0122 SOP class not supported, 0xA900 data set does not match the SOP class, 0xC000 cannot
#: understand; out of resources (0xA7xx), not authorised (0x0124) and processing failures are retried.
_PERMANENT_REASONS = frozenset(
    {status.SOP_CLASS_NOT_SUPPORTED, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, status.CANNOT_UNDERSTAND}
)


class StowDestination:
    """Sends DICOM objects to a DICOMweb server with STOW-RS."""

    def __init__(self, settings: DestinationSettings, metrics: NodeMetrics | None = None) -> None:
        assert settings.url is not None  # the settings validator makes sure
        self.settings = settings
        self.name = settings.name
        self.metrics = metrics or NodeMetrics()
        self._session = session_for(settings, "application/dicom+json")
        self._client = DICOMwebClient(
            url=settings.url.rstrip("/"), session=self._session, timeout=settings.timeout_s
        )
        self._client.set_http_retry_params(retry=False)

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver ``files`` in one STOW-RS request and count the outcome; never raises."""
        if not files:
            return []
        started = time.perf_counter()
        results = self._send(files)
        failed = [r for r in results if not r.ok]
        reason = "http" if failed and failed[0].detail.startswith(("HTTP", "not reachable")) else "status"
        self.metrics.delivery(
            self.name, time.perf_counter() - started, len(results) - len(failed), len(failed), reason
        )
        return results

    def _send(self, files: list[OutgoingFile]) -> list[Delivery]:
        datasets: list[Dataset] = []
        results: dict[int, Delivery] = {}
        uids: dict[str, int] = {}
        for index, item in enumerate(files):
            try:
                ds = dcmread(item.path)
            except (OSError, InvalidDicomError) as exc:
                results[index] = Delivery(item.path, False, f"cannot read the output: {type(exc).__name__}")
                continue
            uids[str(ds.SOPInstanceUID)] = index
            datasets.append(ds)
        if datasets:
            self._post(files, datasets, uids, results)
        return [results[i] for i in range(len(files))]

    def _post(
        self,
        files: list[OutgoingFile],
        datasets: list[Dataset],
        uids: dict[str, int],
        results: dict[int, Delivery],
    ) -> None:
        def all_(ok: bool, detail: str, permanent: bool = False) -> None:
            for index in uids.values():
                results[index] = Delivery(files[index].path, ok, detail, permanent)

        answer: Dataset | None
        try:
            answer = self._client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 409 and exc.response is not None and exc.response.content:
                # 409: some or all failed; the body says which (parsed below)
                answer = _parse_body(exc.response)
                if answer is None:
                    all_(False, describe_status(code))
                    return
            else:
                log.warning("destination %s: STOW-RS answered %s", self.name, describe_status(code))
                all_(False, describe_status(code), is_permanent(code))
                return
        except (requests.ConnectionError, requests.Timeout) as exc:
            log.warning(
                "destination %s (%s): not reachable (%s)", self.name, self.settings.url, type(exc).__name__
            )
            all_(False, f"not reachable: {type(exc).__name__}")
            return
        except requests.RequestException as exc:
            all_(False, f"request failed: {type(exc).__name__}")
            return
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
        failed = {
            str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", status.PROCESSING_FAILURE))
            for item in answer.get("FailedSOPSequence", [])
        }
        for uid, index in uids.items():
            path = files[index].path
            if uid in failed:
                code = failed[uid]
                results[index] = Delivery(
                    path, False, f"STOW-RS failure reason 0x{code:04X}", code in _PERMANENT_REASONS
                )
            elif uid in stored:
                results[index] = Delivery(path, True, "stored")
            else:
                results[index] = Delivery(path, False, "not listed in the STOW-RS answer")


def _parse_body(response: requests.Response) -> Dataset | None:
    """The DICOM JSON answer of a 409 (some instances failed), or None."""
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None
