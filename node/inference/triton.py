"""Models served by Triton Inference Servers (KServe v2 HTTP protocol, ``tritonclient.http``).

``TritonSession`` has the interface of :class:`node.inference.runtime.ModelSession` (``run(batch,
outputs)`` in chunks, ``name``, ``output_names``, ``max_batch``, ``active_provider``, ``warmup``),
so the runner does not know which one it holds. Each model is served under its manifest id with the
manifest's input and output names (``pacs-node models export-triton`` writes such a repository).

- Batching: a batch is sent in chunks of at most ``min(node max_batch, server max_batch_size)``;
  the server's ``max_batch_size`` is read from its model configuration on first use (0, a model
  without batching, leaves the node's cap). Triton's dynamic batcher then merges the chunks of
  concurrent workers (and of other nodes) into larger batches on the GPU.
- Failover: the URLs are tried in order; a connection error (refused, reset, timed out, TLS) moves
  to the next URL, and the URL that answered is tried first next time. When none answers the call
  raises :class:`InferenceError` naming every URL and its error: a transient error (the runner
  retries the job with back-off).
- Server errors (an HTTP error status with a KServe ``{"error": ...}`` body) raise
  :class:`InferenceError` carrying the server's message; they are not retried on another URL (the
  servers share one model repository, so each would answer the same).

``tritonclient``'s HTTP client is not thread-safe: each worker thread gets its own client per URL.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from node.errors import ConfigError, InferenceError

log = logging.getLogger(__name__)

_R = TypeVar("_R")

PROVIDER = "Triton"
_MESSAGE_CHARS = 2000  # a server's message is kept whole up to this (tracebacks can be long)
#: numpy dtype name -> KServe v2 datatype.
_DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "float64": "FP64", "int64": "INT64"}


@dataclass(frozen=True)
class TritonConfig:
    """Where the servers are and how to reach them (from ``models.triton`` in the settings)."""

    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    timeout_s: float = 60.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True
    max_batch: int = 16  # the node's cap; the server's max_batch_size may lower it


@dataclass(frozen=True)
class _Endpoint:
    url: str  # as configured, for messages
    address: str  # host:port[/base], what tritonclient takes
    tls: bool


def _endpoint(url: str) -> _Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"models.triton.urls: a Triton URL is http://host:port or https://host:port (found {url!r})"
        )
    return _Endpoint(url=url, address=parts.netloc + parts.path.rstrip("/"), tls=parts.scheme == "https")


def _tritonclient() -> Any:
    try:
        import tritonclient.http as httpclient
    except ImportError as exc:  # the optional extra is not installed
        raise ConfigError(
            "models.backend is triton but tritonclient is not installed (pip install 'pacs-node[triton]')"
        ) from exc
    return httpclient


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this server cannot be reached": try the next URL."""
    errors: list[type[BaseException]] = [OSError, socket.timeout, ssl.SSLError, ConnectionError]
    try:
        import gevent

        errors.append(gevent.Timeout)
    except ImportError:  # tritonclient[http] brings gevent; without it there is no client anyway
        pass
    return tuple(errors)


class TritonSession:
    """One model on a pool of Triton servers; ``run`` may be called from several threads at once."""

    def __init__(
        self,
        *,
        name: str,
        input_name: str,
        output_names: Sequence[str],
        config: TritonConfig,
        input_dtype: str = "float32",
        fixed_batch: int | None = None,
        model_name: str | None = None,
        client_factory: Callable[[_Endpoint], Any] | None = None,
    ) -> None:
        if config.max_batch < 1:
            raise InferenceError(f"model {name}: max_batch must be >= 1 (found {config.max_batch})")
        if not config.urls:
            raise ConfigError("models.triton.urls: at least one URL is needed")
        self.name = name
        self.model_name = model_name or name
        self.input_name = input_name
        self.output_names: tuple[str, ...] = tuple(output_names)
        self.input_dtype = np.dtype(input_dtype)
        if self.input_dtype.name not in _DATATYPES:
            raise InferenceError(f"model {name}: input dtype {self.input_dtype} has no KServe v2 datatype")
        self.fixed_batch = fixed_batch  # a graph with a fixed batch: chunks padded to it
        self.uses_io_binding = False
        self.providers: tuple[str, ...] = (PROVIDER,)
        self.active_provider = PROVIDER
        self._config = config
        self._endpoints = tuple(_endpoint(u) for u in config.urls)
        self._httpclient = _tritonclient() if client_factory is None else None
        self._client_factory = client_factory or self._make_client
        self._local = threading.local()
        self._lock = threading.Lock()
        self._preferred = 0  # index of the URL that answered last
        self._server_max_batch: int | None = None  # read from the server's model config on first use
        self._connection_errors = _connection_errors()

    # ------------------------------------------------------------------ clients and failover

    def _make_client(self, endpoint: _Endpoint) -> Any:
        cfg = self._config
        options: dict[str, Any] = {}
        if endpoint.tls:
            if cfg.ca_file is not None:
                options["ca_certs"] = str(cfg.ca_file)
            if cfg.cert_file is not None and cfg.key_file is not None:
                options["certfile"] = str(cfg.cert_file)
                options["keyfile"] = str(cfg.key_file)
        http = self._httpclient or _tritonclient()
        return http.InferenceServerClient(
            endpoint.address,
            connection_timeout=cfg.timeout_s,
            network_timeout=cfg.timeout_s,
            ssl=endpoint.tls,
            ssl_options=options or None,
            insecure=endpoint.tls and not cfg.check_hostname,
        )

    def _client(self, index: int) -> Any:
        clients: dict[int, Any] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if index not in clients:
            clients[index] = self._client_factory(self._endpoints[index])
        return clients[index]

    def _drop_client(self, index: int) -> None:
        clients: dict[int, Any] = getattr(self._local, "clients", {})
        client = clients.pop(index, None)
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except self._connection_errors:  # closing a broken connection
                log.debug("closing the Triton client of %s failed", self._endpoints[index].url)

    def _call(self, what: str, request: Callable[[Any], _R]) -> _R:
        """``request(client)`` on the preferred URL, then on the others after connection errors."""
        from tritonclient.utils import InferenceServerException

        start = self._preferred
        order = [(start + k) % len(self._endpoints) for k in range(len(self._endpoints))]
        failures: list[str] = []
        for index in order:
            endpoint = self._endpoints[index]
            try:
                result = request(self._client(index))
            except InferenceServerException as exc:
                message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
                if len(message) > _MESSAGE_CHARS:
                    message = message[:_MESSAGE_CHARS] + " [...]"
                status = exc.status() if callable(getattr(exc, "status", None)) else None
                raise InferenceError(
                    f"model {self.name}: Triton server {endpoint.url} refused {what}"
                    f"{f' (HTTP {status})' if status else ''}: {message}"
                ) from exc
            except self._connection_errors as exc:
                self._drop_client(index)
                failures.append(f"{endpoint.url}: {type(exc).__name__}: {exc}".rstrip(": "))
                log.warning(
                    "model %s: Triton server %s unreachable (%s); trying the next URL",
                    self.name,
                    endpoint.url,
                    exc,
                )
                continue
            if index != self._preferred:
                with self._lock:
                    self._preferred = index
            return result
        raise InferenceError(
            f"model {self.name}: no Triton server reachable for {what} ({'; '.join(failures)})"
        )

    # ------------------------------------------------------------------ model configuration

    @property
    def max_batch(self) -> int:
        """The largest chunk sent in one request: the node's cap, lowered to the server's
        ``max_batch_size`` once that is known."""
        if self.fixed_batch is not None:
            return self.fixed_batch
        server = self._server_max_batch
        return min(self._config.max_batch, server) if server else self._config.max_batch

    def server_max_batch(self) -> int:
        """The model's ``max_batch_size`` in the server's configuration (0: no batching)."""
        if self._server_max_batch is None:
            config = self._call("its model configuration", lambda c: c.get_model_config(self.model_name))
            value = int(config.get("max_batch_size", 0) or 0) if isinstance(config, dict) else 0
            with self._lock:
                self._server_max_batch = value
            log.info(
                "model %s: Triton max_batch_size %d; node chunks of %d", self.name, value, self.max_batch
            )
        return self._server_max_batch

    # ------------------------------------------------------------------ inference

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run a batch (N, ...) in chunks of at most ``max_batch``; outputs concatenated along N."""
        names = tuple(outputs) if outputs is not None else self.output_names
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if x.ndim < 1 or x.shape[0] == 0:
            raise InferenceError(f"model {self.name}: empty batch (shape {x.shape})")
        self.server_max_batch()
        step = self.max_batch
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step]
            n = chunk.shape[0]
            if self.fixed_batch is not None and n < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            result = self._run_chunk(chunk, names)
            for name in names:
                parts[name].append(result[name][:n])
        return {name: np.concatenate(vals) for name, vals in parts.items()}

    def _run_chunk(self, chunk: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        http = self._httpclient or _tritonclient()
        infer_input = http.InferInput(self.input_name, list(chunk.shape), _DATATYPES[self.input_dtype.name])
        infer_input.set_data_from_numpy(chunk, binary_data=True)
        requested = [http.InferRequestedOutput(n, binary_data=True) for n in names]

        def request(client: Any) -> dict[str, np.ndarray]:
            response = client.infer(self.model_name, [infer_input], outputs=requested)
            out = {}
            for n in names:
                value = response.as_numpy(n)
                if value is None:
                    raise InferenceError(f"model {self.name}: Triton's response has no output {n!r}")
                if value.shape[:1] != chunk.shape[:1]:
                    raise InferenceError(
                        f"model {self.name}: Triton's output {n!r} has shape {value.shape} "
                        f"for a batch of {chunk.shape[0]}"
                    )
                out[n] = value
            return out

        return self._call(f"a batch of shape {chunk.shape}", request)

    def warmup(self, shape: Sequence[int]) -> None:
        """Run one zero batch of ``shape`` (the server loads and warms its own instances)."""
        self.run(np.zeros(tuple(shape), dtype=self.input_dtype))
        log.info("model %s warmed up on Triton with a batch of %s", self.name, tuple(shape))


def create_triton_session(model: Any, config: TritonConfig, *, warmup: bool = True) -> TritonSession:
    """A session for a registry model (:class:`~node.inference.registry.LoadedModel`) served by
    Triton under its manifest id. With ``warmup`` the server's configuration is read and one zero
    batch is run; a server that cannot be reached then is logged, not fatal (the first job gets a
    transient error and is retried)."""
    manifest = model.manifest
    outputs = [manifest.outputs.probabilities]
    if manifest.outputs.cam is not None:
        outputs.append(manifest.outputs.cam)
    session = TritonSession(
        name=manifest.id,
        input_name=manifest.input.name,
        output_names=outputs,
        config=config,
        input_dtype=manifest.input.dtype,
        fixed_batch=model.fixed_batch,
    )
    if warmup:
        graph_in = next(i for i in model.inputs if i.name == manifest.input.name)
        dims = [
            m if isinstance(m, int) else g
            for m, g in zip(manifest.input.shape[1:], graph_in.shape[1:], strict=True)
        ]
        try:
            if all(isinstance(d, int) for d in dims):
                session.warmup([model.fixed_batch or 1, *dims])
            else:
                session.server_max_batch()
        except InferenceError as exc:
            log.warning(
                "model %s: Triton warm-up failed (%s); jobs retry until a server answers", manifest.id, exc
            )
    return session
