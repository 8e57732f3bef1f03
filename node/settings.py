"""Node configuration: one YAML file under config/, validated by pydantic-settings, with NODE_* overrides.

Environment variables override the file; nested fields use a double underscore, e.g.
``NODE_DICOM__PORT=11113`` or ``NODE_STORAGE__DATA_DIR=/srv/pacs-node``. Lists take JSON:
``NODE_DICOM__ALLOWED_CALLING_AETS='["MODALITY1","PACS"]'``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.allowlist import parse_allow_entry
from node.budget import MIB, Budget
from node.errors import ConfigError
from node.files import read_yaml

DEFAULT_CONFIG = Path("config/node.yaml")
CONFIG_ENV = "PACS_NODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, not all spaces, without backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_allow_entry(value: str) -> str:
    rule = parse_allow_entry(value)  # raises ValueError with the reason
    if rule.ae_title is not None:
        _check_ae_title(rule.ae_title)
    return value.strip()


AllowEntry = Annotated[str, AfterValidator(_check_allow_entry)]
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """DICOM TLS for the listener (PS3.15 Annex B secure transport, BCP 195 versions)."""

    enabled: bool = False
    cert_file: Path | None = Field(None, description="PEM certificate (chain) of the node")
    key_file: Path | None = Field(None, description="PEM private key (unencrypted) of the node")
    ca_file: Path | None = Field(None, description="PEM CA bundle that client certificates must chain to")
    require_client_cert: bool = Field(False, description="refuse clients without a certificate from ca_file")
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="None: dicom.port speaks TLS only; a port: TLS there, plain TCP stays on dicom.port",
    )
    min_version: TlsVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("dicom.tls.enabled needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("dicom.tls.require_client_cert needs ca_file (the CA of client certificates)")
        return self


class ClientTlsSettings(_Section):
    """DICOM TLS towards a destination."""

    enabled: bool = False
    ca_file: Path | None = Field(None, description="PEM CA bundle for the peer; None: the system trust store")
    cert_file: Path | None = Field(None, description="client certificate, when the peer asks for one")
    key_file: Path | None = None
    server_name: str | None = Field(None, description="name to verify in the peer certificate; default: host")
    check_hostname: bool = True
    min_version: TlsVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _pair(self) -> ClientTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self


class DicomSettings(_Section):
    """The DICOM listener (C-STORE / C-ECHO SCP)."""

    ae_title: AETitle = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu: int = Field(4 * 1024 * 1024, description="largest PDU we accept; 0 means unlimited")
    max_associations: int = Field(16, ge=1, le=1000)
    allowed_calling_aets: list[AllowEntry] = Field(
        default_factory=list,
        description=(
            "entries AE, AE@address, AE@network/prefix or *@network/prefix; "
            "empty: accept every calling AE title (a warning is logged)"
        ),
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)
    acse_timeout_s: float = Field(30.0, gt=0, description="the whole A-ASSOCIATE-RQ must arrive within this")
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(
        60.0, gt=0, description="idle time allowed between PDUs, and the longest one PDU may take to arrive"
    )
    max_associate_rq: int = Field(
        256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="largest A-ASSOCIATE-RQ (and any PDU but P-DATA) read from a peer not yet accepted",
    )
    max_associations_per_address: int = Field(
        16,
        ge=1,
        le=1000,
        description="concurrent connections from one address (from accept); more are rejected (transient)",
    )
    require_called_ae_title: bool = Field(
        False, description="reject an association whose Called AE Title is not ae_title"
    )
    reuse_port: bool = Field(
        False,
        description="let several receiving processes of this host listen on the same port "
        "(SO_REUSEPORT, Linux): the kernel spreads the associations over them, each with its own "
        "committer. Needs the processes' shared PostgreSQL database (docs/scale.md)",
    )

    @field_validator("max_pdu")
    @classmethod
    def _max_pdu(cls, value: int) -> int:
        if value != 0 and not 4096 <= value <= 0xFFFFFFFF:
            raise ValueError("max_pdu is 0 (unlimited) or between 4096 and 4294967295 bytes")
        return value


class TokenSettings(_Section):
    """One bearer token, stored as the hex SHA-256 of the token (never the token itself)."""

    name: str = Field(min_length=1, max_length=64, description="who holds it (shown in logs, not secret)")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex SHA-256 of the token")
    role: Literal["read", "admin"] = Field("read", description="read: pages and API; admin: also retries")


_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class WebSettings(_Section):
    """The status page and JSON API, and who may use them."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tokens: list[TokenSettings] = Field(
        default_factory=list,
        description="bearer tokens; empty: no authentication (only allowed on loopback, see allow_open)",
    )
    allow_open: bool = Field(
        False, description="allow listening beyond loopback without tokens (everyone is admin)"
    )
    metrics_open: bool = Field(True, description="/metrics answers without a token")
    public_url: str = Field(
        "", description="base URL of the pages as others reach them (webhook links); default http://host:port"
    )
    max_upload_mb: float = Field(64.0, gt=0, description="largest upload to POST /api/v1/infer (413 above)")
    infer_timeout_s: float = Field(60.0, gt=0, description="POST /api/v1/infer gives up after this (504)")
    max_stow_mb: float = Field(
        2048.0,
        gt=0,
        description="largest request body to STOW-RS POST /dicomweb/studies (413 above); streamed to disk",
    )
    heatmap_ttl_s: float = Field(600.0, gt=0, description="how long an inference heatmap PNG stays available")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "host names the pages and API answer to (the Host header, against DNS rebinding); empty: "
            "localhost, 127.0.0.1, ::1, web.host, the host of public_url and this machine's names; "
            "the address a connection arrived at is always accepted; '*' turns the check off"
        ),
    )

    @model_validator(mode="after")
    def _refuse_open_network(self) -> WebSettings:
        if self.enabled and not self.tokens and not self.allow_open and self.host not in _LOOPBACK_HOSTS:
            raise ValueError(
                f"the web server would listen on {self.host} without authentication: configure "
                "web.tokens, listen on 127.0.0.1, or set web.allow_open: true"
            )
        return self


class WebhookSettings(_Section):
    """A JSON notification for each urgent study, POSTed by a background thread."""

    url: str = Field("", description="empty: no notifications")
    secret: str = Field("", description="shared secret: X-Node-Signature: sha256=<HMAC of the body>")
    include_patient_identifiers: bool = Field(
        False, description="add patient name and ID to the payload (off unless explicitly allowed)"
    )
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_s: float = Field(5.0, ge=0, description="first retry delay; doubles each attempt")
    timeout_s: float = Field(5.0, gt=0, description="per request")


class ObjectStoreSettings(_Section):
    """S3-compatible object storage that nodes with separate data folders share (docs/scale.md):
    received instances are uploaded before their series is routed, outputs before they are queued."""

    endpoint_url: str = Field(
        "", description="e.g. https://s3.example:8333; empty: AWS S3 of the region (boto3's default)"
    )
    bucket: str = Field(
        min_length=3, max_length=63, description="the bucket (made by the site, not by the node)"
    )
    region: str = Field("us-east-1", min_length=1)
    access_key: SecretStr | None = Field(
        None, description="or NODE_STORAGE__OBJECT_STORE__ACCESS_KEY, or access_key_file"
    )
    secret_key: SecretStr | None = Field(
        None, description="or NODE_STORAGE__OBJECT_STORE__SECRET_KEY, or secret_key_file"
    )
    access_key_file: Path | None = Field(None, description="a file holding the access key (a mounted secret)")
    secret_key_file: Path | None = Field(None, description="a file holding the secret key")
    prefix: str = Field(
        "", max_length=200, description="every key starts with it (several sites on one bucket)"
    )
    verify_tls: bool = Field(
        True, description="https endpoints: verify the certificate (ca_file or the system's)"
    )
    ca_file: Path | None = Field(None, description="PEM CA bundle of the endpoint; None: the system's")
    max_parallel: int = Field(
        8, ge=1, le=64, description="transfers at once (PUTs of a series, GETs of a job)"
    )
    timeout_s: float = Field(30.0, gt=0, le=600, description="connect and read timeout of one request")
    max_attempts: int = Field(4, ge=1, le=20, description="tries of one request on transient errors")
    cache_mb: int = Field(
        2048,
        ge=0,
        description="local copies of objects (data_dir/cache), oldest removed beyond it",
    )

    @model_validator(mode="after")
    def _keys(self) -> ObjectStoreSettings:
        for name in ("access_key", "secret_key"):
            file = getattr(self, f"{name}_file")
            if file is not None:
                if getattr(self, name) is not None:
                    raise ValueError(f"storage.object_store: give {name} or {name}_file, not both")
                try:
                    setattr(self, name, SecretStr(Path(file).read_text().strip()))
                except OSError as exc:
                    raise ValueError(f"storage.object_store.{name}_file {file}: {exc.strerror}") from None
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("storage.object_store: access_key and secret_key go together")
        return self

    def identity(self) -> str:
        """What nodes sharing it compare at start (instead of the data folder's id): endpoint,
        bucket and prefix (a digest of them, to fit the 64 characters of a storage id), never a key."""
        where = f"{self.endpoint_url.rstrip('/')}/{self.bucket}/{self.prefix}"
        return f"s3:{self.bucket[:32]}:{hashlib.sha256(where.encode()).hexdigest()[:16]}"


class StorageSettings(_Section):
    """Where received instances and the database live."""

    data_dir: Path = Path("data")
    database_url: str | None = Field(None, description="default: SQLite file node.db in data_dir")
    fsync: bool = Field(True, description="fsync before acknowledging a C-STORE (turn off only to measure)")
    min_free_mb: int = Field(
        100, ge=0, description="refuse new instances (out of resources) when free space would fall below this"
    )
    duplicates: Literal["keep_first", "keep_last", "refuse"] = Field(
        "keep_first",
        description="a known SOP Instance UID with different content: keep the stored copy (answer "
        "success), replace it and analyse again, or refuse it (0x0111); always recorded",
    )
    orphan_grace_s: float = Field(
        3600.0,
        ge=0,
        description="at start, spool files no row points to and older than this go to data/quarantine",
    )
    object_store: ObjectStoreSettings | None = Field(
        None, description="shared bytes on S3-compatible storage: nodes may then have separate data folders"
    )

    @property
    def spool_dir(self) -> Path:
        """Folder that holds received instances."""
        return self.data_dir / "spool"

    @property
    def url(self) -> str:
        """Database URL, the SQLite default resolved against data_dir."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'node.db').resolve()}"


class AssemblySettings(_Section):
    """When is a series (or study) complete: no new instance for a quiet period."""

    group_by: Literal["series", "study"] = "series"
    series_quiet_s: float = Field(5.0, gt=0, le=86400)
    study_quiet_s: float = Field(10.0, gt=0, le=86400)
    poll_interval_s: float = Field(1.0, gt=0, le=60)


#: The checkout the package runs from (an editable install: ./run-node, ./run-tests).
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _bundled(path: Path) -> Path:
    """A relative path as given when it exists from the working folder; else the project's own
    file of that name (the bundled models and routing rules), so that ``pacs-node serve`` started
    from another folder still finds them; else as given (the caller says it is missing)."""
    if path.is_absolute() or path.exists():
        return path
    candidate = _PROJECT_ROOT / path
    return candidate if candidate.exists() else path


class TritonTlsSettings(_Section):
    """TLS towards Triton servers (used for ``https://`` URLs)."""

    ca_file: Path | None = Field(None, description="PEM CA bundle for the servers; None: the system's")
    cert_file: Path | None = Field(None, description="client certificate, when the server asks for one")
    key_file: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> TritonTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self


class TritonSettings(_Section):
    """Triton Inference Servers (KServe v2 HTTP protocol) that run the models when
    ``models.backend`` is ``triton``; each model is served under its manifest id
    (``pacs-node models export-triton`` writes the repository)."""

    urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        min_length=1,
        description="http://host:port or https://host:port, in order; a connection error moves to the next",
    )
    timeout_s: float = Field(60.0, gt=0, description="connection and network timeout of one request")
    tls: TritonTlsSettings = Field(default_factory=TritonTlsSettings)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.match(r"^https?://[^/\s:]+(:[0-9]{1,5})?(/[^\s]*)?$", url):
                raise ValueError(f"a Triton URL is http://host:port or https://host:port (found {url!r})")
        return value


class ModelsSettings(_Section):
    """Where the model manifests live and how ONNX Runtime (or Triton) runs them."""

    directory: Path = Field(Path("models/onnx"), validate_default=True)
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="onnxruntime: in-process sessions; triton: the servers in models.triton"
    )
    triton: TritonSettings = Field(default_factory=TritonSettings)
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="in order of preference; unavailable ones are skipped, CPU is always the last resort",
    )
    intra_op_threads: int = Field(0, ge=0, description="0: ONNX Runtime's default")
    max_batch: int = Field(16, ge=1, le=1024)
    strict: bool = Field(False, description="refuse to start when any model is refused")
    gpu_preparation: bool = Field(
        True,
        description="decode and prepare the frames of a model that runs on CUDA on the GPU "
        "(nvImageCodec, CuPy: node/inference/gpu_prepare.py) where that is possible; false: "
        "always in the preparation processes on the CPU",
    )

    @field_validator("directory")
    @classmethod
    def _find_directory(cls, value: Path) -> Path:
        return _bundled(value)


class RoutingSettings(_Section):
    """The routing rules file (which series go to which model)."""

    rules_file: Path = Field(Path("config/routes.yaml"), validate_default=True)

    @field_validator("rules_file")
    @classmethod
    def _find_rules(cls, value: Path) -> Path:
        return _bundled(value)


class RunnerSettings(_Section):
    """The workers that run jobs."""

    workers: int = Field(2, ge=1, le=64)
    job_timeout_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20, description="attempts for transient errors")
    retry_backoff_s: float = Field(10.0, ge=0)


DestinationKind = Literal["dicom", "dicomweb", "hl7", "fhir"]


class Hl7Settings(_Section):
    """The HL7 v2 ORU^R01 an ``hl7`` destination receives (one message per finished job)."""

    sending_application: str = Field("PACSNODE", max_length=180, description="MSH-3")
    sending_facility: str = Field("", max_length=180, description="MSH-4")
    receiving_application: str = Field("RIS", max_length=180, description="MSH-5")
    receiving_facility: str = Field("", max_length=180, description="MSH-6")
    processing_id: Literal["P", "T", "D"] = Field("P", description="MSH-11: production, training, debugging")
    triage_field: str = Field(
        "OBR-27.6",
        pattern=r"^(MSH|PID|ORC|OBR)-[0-9]{1,2}(\.[0-9]{1,2})?$",
        description="where the urgent triage flag goes (SEGMENT-FIELD[.COMPONENT]); default the priority "
        "component of OBR-27 Quantity/Timing",
    )
    triage_urgent: str = Field("S", max_length=16, description="value written there for an urgent study")
    triage_routine: str = Field("R", max_length=16, description="value written there otherwise")
    timeout_s: float = Field(30.0, gt=0, description="connect, send and wait for the ACK")


class ClusterSettings(_Section):
    """Several node processes on one PostgreSQL database (docs/scale.md)."""

    node_id: str = Field(
        "",
        max_length=64,
        description="this process's id, stable across restarts (its interrupted jobs are requeued at "
        "start); empty: the host name. Give each process on one host its own id",
    )
    storage_id: str = Field(
        "",
        max_length=64,
        description="identity of the data folder; empty: the id kept in data_dir/.storage-id (made "
        "once); with storage.object_store, the store's identity. Nodes sharing a database share one",
    )
    lease_s: float = Field(
        30.0, ge=1, le=3600, description="a running job's claim; renewed every lease_s/3 by its node"
    )
    queue: Literal["database", "procrastinate"] = Field(
        "database",
        description="database: workers poll the node's job table (every 0.5 s when idle); procrastinate: "
        "each job is also a procrastinate job (PostgreSQL LISTEN/NOTIFY, queueing lock, per-study lock, "
        "priorities, worker heartbeats); PostgreSQL only. Every node of one database sets the same",
    )
    queues: list[str] = Field(
        default_factory=list,
        description="with queue: procrastinate, the queues this worker takes (pacsnode-cpu, pacsnode-gpu, or "
        "those named in model_queues); empty: all",
    )
    model_queues: dict[str, str] = Field(
        default_factory=dict,
        description="with queue: procrastinate, model id -> queue name; a model not named goes to "
        "pacsnode-gpu when the routing node runs it on a GPU provider, else pacsnode-cpu",
    )


class DestinationSettings(_Section):
    """A peer that receives the node's results. ``kind`` says how and what:

    - ``dicom`` (the default): DICOM objects over C-STORE to ``ae_title@host:port``;
    - ``dicomweb``: the same objects over STOW-RS to ``url`` (the DICOMweb root);
    - ``hl7``: one HL7 v2 ORU^R01 per finished job over MLLP to ``host:port`` (a RIS);
    - ``fhir``: one FHIR R4 transaction Bundle (DiagnosticReport + Observations) per finished job,
      POSTed to ``url`` (the FHIR base).
    """

    name: str = Field(min_length=1, max_length=64)
    kind: DestinationKind = "dicom"
    ae_title: AETitle | None = Field(
        None, description="dicom: the peer's AE title (needed); dicomweb: optional (outputs.send_to: origin)"
    )
    host: str | None = Field(None, description="dicom and hl7: the peer's host")
    port: int | None = Field(None, ge=1, le=65535, description="dicom and hl7: the peer's port")
    url: str | None = Field(
        None, pattern=r"^https?://", description="dicomweb: the DICOMweb root; fhir: the FHIR base URL"
    )
    username: str | None = Field(None, description="dicomweb, fhir: HTTP basic authentication user")
    password: SecretStr | None = Field(None, description="with username")
    token: SecretStr | None = Field(None, description="dicomweb, fhir: bearer token (instead of basic)")
    verify_tls: bool = Field(
        True, description="dicomweb, fhir over https: verify the server certificate (tls.ca_file or system)"
    )
    timeout_s: float = Field(60.0, gt=0, description="dicomweb, fhir: per HTTP request")
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    parametric_map: bool = Field(True, description="also send the heatmap as a Parametric Map")
    presentation_state: bool = Field(
        True, description="also send the presentation states that outline the findings on the source images"
    )
    key_objects: bool = Field(True, description="also send the Key Object Selection flagging the key images")
    max_attempts: int = Field(8, ge=1, le=100)
    backoff_initial_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(600.0, ge=0)
    tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)

    @property
    def takes_objects(self) -> bool:
        """True for the kinds that receive DICOM objects (dicom, dicomweb)."""
        return self.kind in ("dicom", "dicomweb")

    @property
    def takes_messages(self) -> bool:
        """True for the kinds that receive one study-level message per job (hl7, fhir)."""
        return self.kind in ("hl7", "fhir")

    @model_validator(mode="after")
    def _per_kind(self) -> DestinationSettings:
        where = f"destination {self.name!r} (kind {self.kind})"
        needs = {"dicom": ("ae_title", "host", "port"), "dicomweb": ("url",), "hl7": ("host", "port")}
        needs["fhir"] = ("url",)
        missing = [f for f in needs[self.kind] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{where} needs {', '.join(missing)}")
        if self.password is not None and self.username is None:
            raise ValueError(f"{where}: password without username")
        if self.token is not None and self.username is not None:
            raise ValueError(f"{where}: choose basic (username/password) or bearer (token), not both")
        if self.kind != "hl7" and self.hl7 != Hl7Settings():
            raise ValueError(f"{where}: the hl7 section is for kind hl7 only")
        return self


class OutputSettings(_Section):
    """What the node writes back and to whom."""

    uid_root: str = Field(
        "1.2.826.0.1.3680043.8.498.",
        description="organisation UID root for every UID the node makes (set your own)",
        pattern=r"^[0-9]+(\.[0-9]+)*\.$",
        max_length=40,
    )
    send_to: Literal["origin", "all"] = Field(
        "origin", description="origin: the destination whose AE title sent the study (all when none matches)"
    )
    sr: bool = True
    secondary_capture: bool = True
    presentation_state: bool = Field(
        True, description="GSPS/CSPS with the hotspot outlines over each source image with a positive finding"
    )
    key_objects: bool = Field(
        True, description="a Key Object Selection of the key images of a job with positives"
    )
    institution_name: str = ""


class LimitsSettings(_Section):
    """The resource budget of one instance, checked before any decode or inflate (C-STORE, the
    jobs and POST /api/v1/infer). The defaults let every real image through with room to spare
    (a 4096x5120 mammogram is 21 M pixels, a 500-frame 512x512 CT 131 M pixels in all) and refuse
    what only a broken or hostile file claims (a JPEG frame header of 65535x65535, a 40000x40000
    JPEG 2000, a deflate bomb)."""

    max_frame_pixels: int = Field(
        2**26,
        ge=1,
        description="Rows x Columns of one frame, also as a codestream header claims it (2^26: 8192x8192)",
    )
    max_frames: int = Field(10_000, ge=1, description="NumberOfFrames of one instance")
    max_decoded_mb: int = Field(
        4096,
        ge=1,
        description="decoded pixel data of one instance, all frames (frames are decoded one by one)",
    )
    max_inflated_mb: int = Field(
        1024,
        ge=1,
        description="a Deflated Explicit VR Little Endian data set once inflated (C-STORE and uploads)",
    )
    decode_memory_mib: int | None = Field(
        None,
        ge=0,
        description=(
            "memory (address space) a preparation process may allocate to decode and prepare a job's "
            "images; more fails the job, not the node. None: 2048 + 16 bytes per max_frame_pixels "
            "(four float32 copies of the largest frame; 3072 with the defaults); 0: decode in the "
            "node's own process (debugging only)"
        ),
    )
    decode_timeout_s: float = Field(
        300.0,
        gt=0,
        description=(
            "most CPU time a preparation process may spend on one job's images (time spent waiting "
            "for a core does not count); a job's preparation that has not finished after 4 times this "
            "fails too"
        ),
    )
    prepare_niceness: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "scheduling niceness of the preparation processes (0: as the node; 19: the lowest "
            "priority): above 0, a model running on the CPU, receiving and the status page keep "
            "their cores while images are prepared beside them"
        ),
    )
    prepare_processes: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "preparation processes (decode and prepare images; one job's images are spread over every "
            "free one while the model runs on the first). None: the machine's cores, at least "
            "runner.workers + 1"
        ),
    )

    def decode_memory(self) -> int:
        """``decode_memory_mib``, or its default derived from the budget; 0: in-process."""
        if self.decode_memory_mib is not None:
            return self.decode_memory_mib
        return min(16384, 2048 + self.max_frame_pixels * 16 // MIB)

    def budget(self) -> Budget:
        """These limits as the Budget that decoding and inflating check."""
        return Budget(
            max_frame_pixels=self.max_frame_pixels,
            max_frames=self.max_frames,
            max_decoded_bytes=self.max_decoded_mb * MIB,
            max_inflated_bytes=self.max_inflated_mb * MIB,
        )


class AuditSettings(_Section):
    """The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) over syslog to an audit
    record repository (docs/audit.md). They carry patient identifiers; they never go to the log."""

    enabled: bool = Field(False, description="send audit messages")
    host: str = Field("127.0.0.1", description="the audit record repository (syslog collector)")
    port: int | None = Field(None, ge=1, le=65535, description="None: 6514 for tls, 514 for udp and tcp")
    transport: Literal["udp", "tcp", "tls"] = Field(
        "tls", description="tls (RFC 5425, as ATNA asks), tcp (RFC 6587 octet counting) or udp (RFC 5426)"
    )
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle of the repository; None: the system's")
    tls_cert_file: Path | None = Field(None, description="client certificate, if the repository asks for one")
    tls_key_file: Path | None = None
    tls_server_name: str | None = Field(None, description="name to verify in its certificate; default: host")
    source_id: str = Field("", max_length=64, description="AuditSourceID; empty: <dicom.ae_title>@<host>")
    enterprise_site_id: str = Field("", max_length=64, description="AuditEnterpriseSiteID (optional)")
    app_name: str = Field("pacs-node", max_length=48, pattern=r"^[!-~]+$", description="syslog APP-NAME")
    msgid: Literal["DICOM+RFC3881", "IHE+RFC-3881"] = Field(
        "DICOM+RFC3881", description="syslog MSGID (ITI TF-2: DICOM+RFC3881 for the DICOM schema)"
    )
    queue_size: int = Field(10_000, ge=10, le=10**6, description="messages kept while the repository is away")

    @model_validator(mode="after")
    def _pair(self) -> AuditSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("audit.tls_cert_file and audit.tls_key_file go together")
        return self


class LoggingSettings(_Section):
    """Log level and format (logs never carry patient identifiers)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """All node settings. Build them with :func:`load_settings`, not at import time."""

    model_config = SettingsConfigDict(env_prefix="NODE_", env_nested_delimiter="__", extra="forbid")

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables override the values read from the file (passed as init values)."""
        return env_settings, init_settings


def _describe(error: ErrorDetails) -> str:
    location = ".".join(str(p) for p in error["loc"]) or "(top level)"
    found = error.get("input")
    shown = "" if isinstance(found, dict) else f" (found {found!r})"
    return f"{location}: {error['msg']}{shown}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration file, apply NODE_* overrides, or raise ConfigError.

    ``path`` None means config/node.yaml when it exists, otherwise embedded defaults.
    ``overrides`` are merged over the file (sections as dicts), for tests and the CLI.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        source = str(path)
        loaded = read_yaml(Path(path), "configuration file", ConfigError) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section] = {**(data.get(section) or {}), **values}
        else:
            data[section] = values
    try:
        return Settings(**data)
    except ValidationError as exc:
        details = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration in {source} (or NODE_* environment): {details}") from exc
