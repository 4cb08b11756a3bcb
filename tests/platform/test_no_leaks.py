"""A stored secret value never shows up in logs, errors, reprs or the database row.

A distinctive random value goes through a workflow-like use (create credential → resolve
→ build an ``Authorization: Bearer`` header as a node would → log and raise with the
SecretStr and the credential object in hand), with structlog at DEBUG writing JSON to
stderr (botocore's request/response logging included). Then everything captured is
scanned for the value and its encodings.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import secrets as pysecrets
import socket
import threading
import traceback
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
import structlog
from sqlmodel import Session, select

from flowbuilder.platform import crypto, secrets
from flowbuilder.platform.crud import credentials_crud
from flowbuilder.platform.errors import FlowBuilderError, SecretError
from flowbuilder.platform.logging import setup_logging
from flowbuilder.platform.models import (
    Credential,
    CredentialRead,
    DatabaseSecret,
    ExecutionLog,
    ExecutionPhase,
    PhaseStatus,
    WorkflowExecution,
)
from flowbuilder.platform.nodes.base import NodeContext, NodeCredential, NodeError
from flowbuilder.platform.settings import override_settings
from tests.factories import make_user, make_workflow


def _forms(value: str) -> list[str]:
    raw = value.encode()
    return [
        value,
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
    ]


def _leaks(text: str, value: str) -> list[str]:
    return [form for form in _forms(value) if form in text]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def debug_logging(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The platform's logging at DEBUG (JSON to stderr); the previous setup is restored.

    Depends on ``capfd`` so the handler writes to the stderr that capfd captures.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    noisy = ("botocore", "boto3", "urllib3", "httpx", "httpcore")
    saved_noisy = {name: logging.getLogger(name).level for name in noisy}
    saved_structlog = structlog.get_config()
    setup_logging("DEBUG", json=True, force=True)
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_noisy.items():
            logging.getLogger(name).setLevel(level)
        structlog.reset_defaults()
        structlog.configure(**saved_structlog)


def _exception_texts(exc: BaseException) -> list[str]:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for arg in exc.args:
        texts.append(repr(arg))
    return texts


def test_secret_value_never_leaks(
    session: Session,
    backend: str,
    debug_logging: None,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    value = "canary-" + pysecrets.token_urlsafe(24)
    log = structlog.get_logger("tests.no_leaks")
    stdlib_log = logging.getLogger("tests.no_leaks.stdlib")
    seen: list[str] = []  # every string produced along the way, scanned at the end

    # --- store and resolve, as the API and then the worker do --------------------------------
    user = make_user(session)
    stranger = make_user(session)
    credential = credentials_crud.create_credential(
        session=session, user_id=user.id, name="prod api", type="bearer_token", secret_value=value
    )
    session.commit()
    resolved, secret = credentials_crud.resolve_credential_value(
        session=session, credential_id=credential.id, user_id=user.id
    )
    assert secret.get_secret_value() == value

    # --- a node uses it ------------------------------------------------------------------------
    node_credential = NodeCredential(type=resolved.type, secret=secret, name=resolved.name)
    context = NodeContext(
        execution_id=uuid.uuid4(), user_id=user.id, node_id="n1", credential=node_credential
    )
    headers = {"Authorization": f"Bearer {context.credential.secret.get_secret_value()}"}
    # The scanner must be able to see the value where it legitimately is.
    assert _leaks(headers["Authorization"], value) == [value]

    log.info(
        "node_request_prepared",
        credential=resolved,
        secret=secret,
        value=secret,
        node_credential=node_credential,
        context=context,
        authorization=headers["Authorization"],
    )
    log.debug("node_credential_debug", cred=repr(resolved), masked=str(secret))
    stdlib_log.info("resolved %s for %r via %s", secret, resolved, node_credential)
    context.log.info(f"calling the API with credential {node_credential} ({secret})")
    seen.extend(entry.message for entry in context.log.drain())

    # --- errors that carry the credential objects ---------------------------------------------
    errors: list[BaseException] = []
    try:
        raise NodeError(f"request failed using {secret} / {secret!r} / {resolved!r} / {context}")
    except NodeError as exc:
        log.exception("node_failed", credential=resolved)
        stdlib_log.exception("node failed with %r", node_credential)
        errors.append(exc)
    try:
        raise FlowBuilderError(node_credential, resolved, secret)
    except FlowBuilderError as exc:
        log.error("wrapped", exc_info=True)
        errors.append(exc)

    # --- failure paths of the secret machinery itself -------------------------------------------
    for call in (
        lambda: credentials_crud.resolve_credential_value(
            session=session, credential_id=credential.id, user_id=stranger.id
        ),
        lambda: secrets.retrieve_secret(credential.secret_ref, session, stranger.id),
        lambda: secrets.retrieve_secret(value, session, user.id),  # value passed as a reference
        lambda: credentials_crud.create_credential(
            session=session, user_id=user.id, name="prod api", type="nope", secret_value=value
        ),
        lambda: credentials_crud.create_credential(
            session=session, user_id=user.id, name="prod api", type="api_key", secret_value=value
        ),
    ):
        try:
            call()
        except FlowBuilderError as exc:
            log.warning("expected_failure", error=str(exc), exc_info=True)
            errors.append(exc)
        else:  # pragma: no cover
            pytest.fail("expected an error")
    if backend == "db":
        row = session.exec(select(DatabaseSecret)).one()
        try:
            crypto.DatabaseSecretManager(
                "some-other-password-x", "some-other-salt-y", old_password=""
            ).decrypt_secret(row.encrypted_value)
        except SecretError as exc:
            errors.append(exc)
        tampered = row.encrypted_value[:-5] + "AAAAA"
        try:
            crypto.decrypt_secret(tampered)
        except SecretError as exc:
            errors.append(exc)
    else:
        with override_settings(SECRETS_MANAGER_ENDPOINT_URL=_closed_port_url()):
            for call in (
                lambda: credentials_crud.create_credential(
                    session=session, user_id=user.id, name="x", type="api_key", secret_value=value
                ),
                lambda: credentials_crud.resolve_credential_value(
                    session=session, credential_id=credential.id, user_id=user.id
                ),
                lambda: credentials_crud.delete_credential(
                    session=session, credential_id=credential.id, user_id=user.id
                ),
            ):
                try:
                    call()
                except SecretError as exc:
                    log.error("backend_down", exc_info=True)
                    errors.append(exc)
    assert len(errors) >= 8
    for exc in errors:
        seen.extend(_exception_texts(exc))

    # --- reprs and stored data ------------------------------------------------------------------
    session.expire_all()
    for row in session.exec(select(DatabaseSecret)):
        seen += [row.encrypted_value, repr(row), str(row.model_dump())]
    for cred in session.exec(select(Credential)):
        seen += [repr(cred), str(cred), cred.model_dump_json()]
        seen.append(CredentialRead.model_validate(cred).model_dump_json())
    seen += [repr(secret), str(secret), repr(node_credential), repr(context)]
    seen += [repr(crypto.DatabaseSecretManager()), repr(crypto._KEY_CACHE)]

    # --- and finally the deletion path ----------------------------------------------------------
    credentials_crud.delete_credential(
        session=session, credential_id=credential.id, user_id=user.id
    )
    session.commit()

    captured = capfd.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    for record in caplog.records:
        seen += [record.getMessage(), repr(record.msg), repr(record.args), repr(record.__dict__)]

    # The logs did run (otherwise there is nothing to prove).
    assert "node_request_prepared" in captured.err
    assert "credential_resolved" in captured.err
    assert "[redacted]" in captured.err  # authorization=... was dropped by the processor
    if backend != "db":
        assert "botocore" in captured.err or any(
            r.name.startswith("botocore") for r in caplog.records
        )

    everything = "\n".join(seen)
    assert _leaks(everything, value) == []


def test_botocore_debug_records_with_secret_payloads_are_withheld(
    session: Session,
    moto_reset: str,
    debug_logging: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG botocore logs request params and response bodies; ours are withheld."""
    caplog.set_level(logging.DEBUG)
    value = "boto-canary-" + pysecrets.token_hex(12)
    with override_settings(USE_DB_SECRETS=False, SECRETS_MANAGER_ENDPOINT_URL=moto_reset):
        user = make_user(session)
        ref = secrets.create_secret(session, "k", value, user.id)
        assert secrets.retrieve_secret(ref, session, user.id) == value
    botocore_records = [r for r in caplog.records if r.name.startswith("botocore")]
    assert botocore_records, "botocore debug logging did not run"
    withheld = [r for r in botocore_records if "withheld" in r.getMessage()]
    assert withheld  # CreateSecret params and the GetSecretValue response at least
    texts: list[Any] = [caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    assert _leaks("\n".join(texts), value) == []


# --- every form a credential takes when sent, echoed back by a server (issue 11, item 2) -------
#
# A real HTTP node sends each credential type to a local server that reflects the request
# in every way a server might: headers as JSON, each value URL-encoded (as in a query
# string), the whole header block as one JSON-escaped text, basic auth decoded into its
# halves, and response headers mirroring the request's. Then the execution's stored
# outputs, errors, execution logs and the worker's own log lines are scanned for every
# form of the secret, computed here independently of the redaction code.


def _echo_handler() -> type[http.server.BaseHTTPRequestHandler]:
    class Echo(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            headers = dict(self.headers.items())
            decoded: list[str] = []
            auth = headers.get("Authorization", "")
            if auth.startswith("Basic "):
                plain = base64.b64decode(auth[6:]).decode()
                decoded = [plain, *plain.split(":", 1)]
            body = {
                "headers": headers,
                "query_style": {k: quote(v, safe="") for k, v in headers.items()},
                "form_style": urlencode(headers),
                "raw": json.dumps(str(self.headers)),
                "basic_decoded": decoded,
                "path": self.path,
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                if name.lower() not in ("host", "content-length", "content-type"):
                    self.send_header(f"X-Echo-{name}", value)
            self.end_headers()
            self.wfile.write(data)

    return Echo


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _echo_handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        with override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]):
            yield f"http://127.0.0.1:{server.server_address[1]}/echo"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def worker_log() -> Iterator[io.StringIO]:
    """The platform's logging at DEBUG (JSON), written to a buffer the test reads.

    (Independent of capfd: the worker's log lines are what is scanned.)
    """
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    names = ("botocore", "boto3", "urllib3", "httpx", "httpcore")
    saved_levels = {name: logging.getLogger(name).level for name in names}
    saved_structlog = structlog.get_config()
    setup_logging("DEBUG", json=True, force=True)
    buffer = io.StringIO()
    for handler in root.handlers:
        if handler.get_name() == "flowbuilder":
            handler.setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        structlog.reset_defaults()
        structlog.configure(**saved_structlog)


def _sent_forms(kind: str, stored: str) -> list[str]:
    """What must never be stored: the secret parts as sent, and their encodings."""
    if kind == "header":
        parts = [stored, stored.partition(":")[2].strip()]
    elif kind == "basic_auth":
        parts = [stored, stored.partition(":")[2], base64.b64encode(stored.encode()).decode()]
    else:
        parts = [stored, stored.strip()]
    forms: list[str] = []
    for part in parts:
        forms += _forms(part)
        forms += [quote(part, safe=""), quote_plus(part), json.dumps(part)[1:-1]]
    return sorted(set(forms))


# Characters that URL-encoding, JSON-escaping and base64 each change.
def _canary() -> str:
    return "cnry/" + pysecrets.token_urlsafe(18) + "+x=y"


CASES = {
    "bearer_token": lambda c: c,
    "api_key": lambda c: c,
    "header": lambda c: f"X-Custom-Auth: {c}",  # the form issue 11 found leaking
    "basic_auth": lambda c: f"svc-user:{c}",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_echoed_credential_is_redacted_everywhere(
    engine: Any,
    session: Session,
    echo_url: str,
    kind: str,
    worker_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flowbuilder.platform import engine as runner

    caplog.set_level(logging.DEBUG)
    stored = CASES[kind](_canary())
    user = make_user(session, credits=10)
    cred = credentials_crud.create_credential(
        session=session, user_id=user.id, name=f"{kind} cred", type=kind, secret_value=stored
    )
    definition = {
        "version": 1,
        "nodes": [
            {
                "id": "call",
                "type": "http_request",
                "inputs": {"url": echo_url + "?q=1"},
                "credential_id": str(cred.id),
            }
        ],
        "edges": [],
    }
    workflow = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    execution = runner.prepare_execution(session=session, workflow_id=workflow.id, user_id=user.id)
    session.commit()
    runner.run_execution(execution.id)

    session.expire_all()
    phase = session.exec(
        select(ExecutionPhase).where(ExecutionPhase.execution_id == execution.id)
    ).one()
    assert phase.status == PhaseStatus.COMPLETED, phase.error
    echoed = phase.outputs["body"]
    # The server did receive and reflect the credential (else nothing is proven).
    assert echoed["headers"] and "[redacted]" in json.dumps(echoed)
    if kind == "header":
        assert echoed["headers"]["X-Custom-Auth"] == "[redacted]"
    if kind == "basic_auth":
        # "user:password" is the stored value itself; the password half alone is a form too.
        assert echoed["basic_decoded"] == ["[redacted]", "svc-user", "[redacted]"]

    texts = [json.dumps(phase.outputs), str(phase.error), str(phase.inputs)]
    execution_row = session.get(WorkflowExecution, execution.id)
    texts += [str(execution_row.error), json.dumps(execution_row.model_dump(mode="json"))]
    texts += [
        log.message
        for log in session.exec(
            select(ExecutionLog).where(ExecutionLog.execution_id == execution.id)
        )
    ]
    assert "outbound_request" in worker_log.getvalue()  # the worker's lines were captured
    texts += [worker_log.getvalue(), caplog.text]
    everything = "\n".join(texts)
    leaked = [form for form in _sent_forms(kind, stored) if form in everything]
    assert leaked == []


def _leaky_node(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    """A careless node: puts its credential in its outputs and logs, then crashes with it."""
    value = ctx.credential.secret.get_secret_value()
    ctx.log.info(f"using {value}")
    if inputs.get("crash"):
        raise RuntimeError(f"could not use {value}")
    return {"out": {"nested": [value] * 3, value: "as a key"}}


@pytest.fixture
def leaky_node() -> Iterator[str]:
    from flowbuilder.platform.nodes import register_node_type, unregister_node_type
    from flowbuilder.platform.nodes.base import NodeType, PortSpec

    node_type = NodeType(
        type="test_leaky",
        run=_leaky_node,
        inputs={"crash": PortSpec("any")},
        outputs={"out": PortSpec("any")},
        credential="required",
        credits=1,
    )
    register_node_type(node_type, replace=True)
    yield node_type.type
    unregister_node_type(node_type.type)


@pytest.mark.parametrize("crash", [False, True])
def test_generic_credential_a_node_leaks_is_redacted(
    engine: Any,
    session: Session,
    leaky_node: str,
    crash: bool,
    worker_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outputs (values and keys), execution logs, the phase error and the worker's
    crash traceback never carry the credential, whatever the node does with it."""
    from flowbuilder.platform import engine as runner

    caplog.set_level(logging.DEBUG)
    stored = _canary()
    user = make_user(session, credits=10)
    cred = credentials_crud.create_credential(
        session=session, user_id=user.id, name="generic", type="generic", secret_value=stored
    )
    definition = {
        "version": 1,
        "nodes": [
            {
                "id": "leak",
                "type": leaky_node,
                "inputs": {"crash": crash},
                "credential_id": str(cred.id),
            }
        ],
        "edges": [],
    }
    workflow = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    execution = runner.prepare_execution(session=session, workflow_id=workflow.id, user_id=user.id)
    session.commit()
    runner.run_execution(execution.id)
    session.expire_all()
    phase = session.exec(
        select(ExecutionPhase).where(ExecutionPhase.execution_id == execution.id)
    ).one()
    logs = [
        log.message
        for log in session.exec(
            select(ExecutionLog).where(ExecutionLog.execution_id == execution.id)
        )
    ]
    log_text = worker_log.getvalue()
    assert "execution_finished" in log_text  # the worker's lines were captured
    if crash:
        assert phase.status == PhaseStatus.FAILED
        assert "node_crashed" in log_text and "RuntimeError: could not use [redacted]" in log_text
    else:
        assert phase.outputs["out"]["nested"] == ["[redacted]"] * 3
        assert phase.outputs["out"]["[redacted]"] == "as a key"
    assert any("using [redacted]" in line for line in logs)
    texts = [json.dumps(phase.outputs), str(phase.error), *logs]
    texts += [log_text, caplog.text]
    everything = "\n".join(texts)
    assert [form for form in _sent_forms("generic", stored) if form in everything] == []
