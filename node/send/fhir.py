"""FHIR R4 out: one transaction Bundle per finished job, POSTed to the FHIR base with bearer (or
basic) authentication; retries are the outbox's.

The Bundle (built by :func:`build_bundle` with ``fhir.resources``' validated R4B models, which are
R4 for every resource used here) follows the mapping of the HL7 "DICOM SR to FHIR" implementation
guide for TID 1500 measurement groups:

- one Observation per finding: ``code`` the finding's concept, ``valueCodeableConcept`` Present /
  Absent (SCT), a ``component`` with the probability (DCM 122157 Probability, UCUM "1"),
  ``interpretation`` A/N, ``derivedFrom`` the ImagingStudy, ``device`` the algorithm's Device;
- a DiagnosticReport (category RAD, LOINC 18748-4) with the Observations as ``result`` and the
  ImagingStudy as ``imagingStudy``;
- Patient, ImagingStudy (identifier urn:dicom:uid) and Device (the model and its version).

Every entry is a conditional create (``ifNoneExist`` on an identifier derived from the job), so
a retry after a lost answer creates nothing twice. Bundles hold patient data: never logged.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any

import requests

from node.prometheus import NodeMetrics
from node.send import Delivery, OutgoingFile, StudyContext
from node.send.http import describe_status, is_permanent, session_for
from node.settings import DestinationSettings
from node.types import AnalysisResult, Code, OutputIdentity

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "RADLEX": "http://radlex.org",
    "UCUM": "http://unitsofmeasure.org",
}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_UID_SYSTEM = "urn:dicom:uid"
_NODE_SYSTEM = "urn:ietf:rfc:3986"


def coding(code: Code) -> dict[str, str]:
    """A FHIR Coding for a DICOM-style code (a private scheme gets a URN of its designator)."""
    system = _SYSTEMS.get(code.scheme_designator.upper(), f"urn:pacs-node:scheme:{code.scheme_designator}")
    return {"system": system, "code": code.value, "display": code.meaning}


def _date(dicom_date: str) -> str | None:
    if len(dicom_date) == 8 and dicom_date.isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return None


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def build_bundle(
    result: AnalysisResult, study: StudyContext, identity: OutputIdentity, report_uid: str, now: datetime
) -> dict[str, Any]:
    """The transaction Bundle (as JSON-ready data, validated by fhir.resources) for one job."""
    from fhir.resources.R4B.bundle import Bundle

    algo = result.algorithm
    ids = {k: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, f'{report_uid}/{k}')}" for k in ("p", "s", "d", "r")}
    issued = now.strftime("%Y-%m-%dT%H:%M:%SZ")  # the node keeps UTC
    entries: list[dict[str, Any]] = []

    def add(key: str, resource: dict[str, Any], system: str, value: str) -> None:
        entries.append(
            {
                "fullUrl": ids.get(key, key),
                "resource": resource,
                "request": {
                    "method": "POST",
                    "url": resource["resourceType"],
                    "ifNoneExist": f"identifier={system}|{value}",
                },
            }
        )

    patient_system = f"urn:pacs-node:issuer:{study.issuer_of_patient_id or 'none'}"
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if study.patient_id:
        patient["identifier"] = [{"system": patient_system, "value": study.patient_id}]
    parts = study.patient_name.split("^")
    if any(parts):
        name: dict[str, Any] = {}
        if parts[0]:
            name["family"] = parts[0]
        given = [p for p in parts[1:3] if p]
        if given:
            name["given"] = given
        patient["name"] = [name]
    if (birth := _date(study.birth_date)) is not None:
        patient["birthDate"] = birth
    if study.sex:
        patient["gender"] = {"M": "male", "F": "female", "O": "other"}[study.sex]
    if study.patient_id:
        add("p", patient, patient_system, study.patient_id)
    else:  # no identifier to match on: a plain create, done once per report
        add("p", patient, _NODE_SYSTEM, _oid(report_uid + ".1"))
        patient["identifier"] = [{"system": _NODE_SYSTEM, "value": _oid(report_uid + ".1")}]
    subject = {"reference": ids["p"]}

    imaging: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": _UID_SYSTEM, "value": _oid(study.study_uid)}],
        "status": "available",
        "subject": subject,
    }
    if study.accession_number:
        imaging["identifier"].append(
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": study.accession_number,
            }
        )
    if study.study_description:
        imaging["description"] = study.study_description
    add("s", imaging, _UID_SYSTEM, _oid(study.study_uid))

    device_id = f"{algo.model_id}:{algo.version}"
    device = {
        "resourceType": "Device",
        "identifier": [{"system": "urn:pacs-node:model", "value": device_id}],
        "deviceName": [{"name": algo.name, "type": "model-name"}],
        "manufacturer": algo.manufacturer,
        "version": [{"value": algo.version}],
    }
    if algo.research_use_only:
        device["note"] = [{"text": "Research model, not for diagnostic use"}]
    add("d", device, "urn:pacs-node:model", device_id)

    results = []
    for index, finding in enumerate(result.findings, start=1):
        present = finding.positive
        value = Code("52101004", "SCT", "Present") if present else Code("272519000", "SCT", "Absent")
        abnormal = finding.positive and not finding.normal
        obs_id = _oid(f"{report_uid}.{index + 1}")
        key = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, obs_id)}"
        observation = {
            "resourceType": "Observation",
            "identifier": [{"system": _NODE_SYSTEM, "value": obs_id}],
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": {"coding": [coding(finding.code)], "text": finding.label},
            "subject": subject,
            "issued": issued,
            "valueCodeableConcept": {"coding": [coding(value)]},
            "interpretation": [{"coding": [{"system": _INTERPRETATION, "code": "A" if abnormal else "N"}]}],
            "component": [
                {
                    "code": {"coding": [coding(Code("122157", "DCM", "Probability"))]},
                    "valueQuantity": {
                        "value": round(float(finding.probability), 4),
                        "unit": "1",
                        "system": _SYSTEMS["UCUM"],
                        "code": "1",
                    },
                }
            ],
            "derivedFrom": [{"reference": ids["s"]}],
            "device": {"reference": ids["d"]},
        }
        entries.append(
            {
                "fullUrl": key,
                "resource": observation,
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={_NODE_SYSTEM}|{obs_id}",
                },
            }
        )
        results.append({"reference": key})

    positives = [f.label for f in result.findings if f.positive and not f.normal]
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": _NODE_SYSTEM, "value": _oid(report_uid)}],
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ]
        },
        "subject": subject,
        "issued": issued,
        "imagingStudy": [{"reference": ids["s"]}],
        "result": results,
        "conclusion": (
            f"{algo.name} {algo.version}: " + (", ".join(positives) if positives else "no positive finding")
        )
        + (" (research model, not for diagnostic use)" if algo.research_use_only else ""),
    }
    add("r", report, _NODE_SYSTEM, _oid(report_uid))
    bundle = Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return json.loads(bundle.model_dump_json(exclude_none=True))


class FhirDestination:
    """POSTs transaction Bundles to a FHIR server."""

    def __init__(self, settings: DestinationSettings, metrics: NodeMetrics | None = None) -> None:
        assert settings.url is not None  # the settings validator makes sure
        self.settings = settings
        self.name = settings.name
        self.metrics = metrics or NodeMetrics()
        self._session = session_for(settings, FHIR_JSON)
        self._base = settings.url.rstrip("/")

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """POST each Bundle; never raises for a peer failure."""
        if not files:
            return []
        started = time.perf_counter()
        results = []
        for item in files:
            results.append(self._post(item))
            if results[-1].detail.startswith("not reachable"):  # the rest would wait for the same timeout
                results += [Delivery(f.path, False, results[-1].detail) for f in files[len(results) :]]
                break
        failed = [r for r in results if not r.ok]
        reason = "http" if failed else "status"
        self.metrics.delivery(
            self.name, time.perf_counter() - started, len(results) - len(failed), len(failed), reason
        )
        return results

    def _post(self, item: OutgoingFile) -> Delivery:
        try:
            body = item.path.read_bytes()
        except OSError as exc:
            return Delivery(item.path, False, f"cannot read the output: {type(exc).__name__}")
        try:
            rsp = self._session.post(
                self._base, data=body, headers={"Content-Type": FHIR_JSON}, timeout=self.settings.timeout_s
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            log.warning("destination %s (%s): not reachable (%s)", self.name, self._base, type(exc).__name__)
            return Delivery(item.path, False, f"not reachable: {type(exc).__name__}")
        except requests.RequestException as exc:
            return Delivery(item.path, False, f"request failed: {type(exc).__name__}")
        if not 200 <= rsp.status_code < 300:
            log.warning(
                "destination %s: the FHIR server answered %s", self.name, describe_status(rsp.status_code)
            )
            return Delivery(item.path, False, describe_status(rsp.status_code), is_permanent(rsp.status_code))
        try:
            answer = rsp.json()
            statuses = [str(e["response"]["status"]) for e in answer.get("entry", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return Delivery(item.path, False, "the answer is not a transaction-response Bundle")
        if answer.get("resourceType") != "Bundle" or not statuses or not all(s[:1] == "2" for s in statuses):
            return Delivery(item.path, False, "the transaction-response Bundle holds a failed entry")
        return Delivery(item.path, True, describe_status(rsp.status_code))
