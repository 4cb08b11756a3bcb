"""Structured logging: structlog JSON lines, one configuration for every process.

``setup_logging()`` is called once per process (worker, beat, CLI). Context such as the
execution id is bound with ``structlog.contextvars`` and cleared when the run ends, so
every line of a run carries it and no line of the next run does.

A redaction processor drops the values of keys that look secret (password, token,
secret, authorization, ...) as a last line of defence; the first line is never logging
a secret at all.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from flowbuilder.platform.settings import get_settings

_SECRET_KEY = re.compile(
    r"(^|_|-)(pass(word)?|secret|token|authorization|api[_-]?key|cookie|credential_value)"
    r"($|_|-)",
    re.I,
)
REDACTED = "[redacted]"


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 5:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def _redact(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop values under secret-looking keys, also inside nested dicts (headers)."""
    for key in list(event_dict):
        if key == "event":
            continue
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(event_dict[key], dict | list | tuple):
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


_configured = False


def setup_logging(
    level: str | None = None, *, json: bool | None = None, force: bool = False
) -> None:
    """Configure structlog and the standard library's root logger (idempotent)."""
    global _configured
    if _configured and not force:
        return
    settings = get_settings()
    level_name = (level or settings.log_level).upper()
    use_json = settings.LOG_JSON if json is None else json

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Lines from the standard library (celery, kombu, sqlalchemy) get the same shape.
        # ExtraAdder: the ids that flowbuilder.tasks.logcontext puts on Celery's records.
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(
                allow=("execution_id", "workflow_id", "user_id", "correlation_id")
            ),
            *shared,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("flowbuilder")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "flowbuilder":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level_name)
    # Chatty libraries stay at WARNING unless we debug.
    for noisy in ("botocore", "boto3", "urllib3", "kombu", "httpx"):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if level_name == "DEBUG" else logging.WARNING
        )
    # httpcore's debug trace prints raw response headers, which a server may use to echo a
    # credential back; the platform's own outbound_request line says what matters.
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    _configured = True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


bind_context = structlog.contextvars.bind_contextvars
clear_context = structlog.contextvars.clear_contextvars
