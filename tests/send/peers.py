"""Real peers on loopback for the message destinations:

- :class:`MllpReceiver`: python-hl7's asyncio MLLP server (``hl7.mllp``), which parses each
  message with python-hl7 and answers with an ACK it builds itself (``Message.create_ack``);
- :class:`FhirReceiver`: a small FHIR transaction endpoint (no FHIR server can be installed from
  the package registries here): it checks the bearer token, validates each Bundle with
  ``fhir.resources`` (R4B models), resolves ``ifNoneExist`` on identifiers as a server does, and
  answers with a transaction-response Bundle.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from hl7.mllp import start_hl7_server

from tests.helpers import free_port, wait_port


class MllpReceiver:
    """A RIS stand-in: receives ORUs over MLLP; ``acks`` lists the next ACK codes to answer."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[hl7.Message] = []
        self.acks: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="mllp-receiver", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        wait_port(self.port, 10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(reader, writer) -> None:
            try:
                while not writer.is_closing():
                    message = await reader.readmessage()
                    self.received.append(message)
                    code = self.acks.pop(0) if self.acks else "AA"
                    writer.writemessage(message.create_ack(code))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                if not writer.is_closing():
                    writer.close()

        async def start() -> None:
            self._server = await start_hl7_server(handle, "127.0.0.1", self.port, encoding="utf-8")

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the server and end its thread."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class FhirReceiver:
    """A FHIR transaction endpoint on loopback (see the module text)."""

    def __init__(self, token: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.token = token
        self.bundles: list[Any] = []  # fhir.resources Bundle models, as received
        self.stored: dict[tuple[str, str], str] = {}  # (resource type, identifier) -> id
        self.fail_next: list[int] = []  # HTTP statuses to answer before accepting again
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {receiver.token}":
                    return self._answer(401, _outcome("login", "bearer token missing or wrong"))
                if receiver.fail_next:
                    return self._answer(receiver.fail_next.pop(0), _outcome("transient", "try later"))
                if not self.headers.get("Content-Type", "").startswith("application/fhir+json"):
                    return self._answer(415, _outcome("not-supported", "application/fhir+json only"))
                try:
                    answer = receiver.transaction(body)
                except ValueError as exc:
                    return self._answer(400, _outcome("invalid", str(exc)[:200]))
                self._answer(200, answer)

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fhir-receiver", daemon=True)
        self._thread.start()
        wait_port(self.port, 10)

    @property
    def url(self) -> str:
        """The FHIR base."""
        return f"http://127.0.0.1:{self.port}/fhir"

    def transaction(self, body: bytes) -> dict:
        """Validate the Bundle and process it as a FHIR server processes a transaction."""
        from fhir.resources.R4B.bundle import Bundle

        bundle = Bundle.model_validate_json(body)  # ValueError (ValidationError) when invalid
        if bundle.type != "transaction":
            raise ValueError(f"Bundle.type is {bundle.type}, not transaction")
        self.bundles.append(bundle)
        entries = []
        for entry in bundle.entry or []:
            kind = entry.resource.get_resource_type()
            condition = entry.request.ifNoneExist or ""
            key = (kind, condition.removeprefix("identifier="))
            if condition and key in self.stored:
                entries.append({"response": {"status": "200 OK", "location": f"{kind}/{self.stored[key]}"}})
                continue
            new_id = uuid.uuid4().hex[:16]
            if condition:
                self.stored[key] = new_id
            entries.append({"response": {"status": "201 Created", "location": f"{kind}/{new_id}/_history/1"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _outcome(code: str, text: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
