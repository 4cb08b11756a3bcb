"""Process settings, read once from the environment and an optional ``.env``.

Everything that configures the execution core goes through :func:`get_settings`,
a cached accessor that tests replace with :func:`override_settings`. Nothing deep
inside the package reads ``os.environ`` itself, so a test can never be surprised
by a value it did not set.

The variable names follow the original shared-module design (DB_HOST, USE_DB_SECRETS,
SQS_ENDPOINT_URL, ...). DATABASE_URL, BROKER_URL and REDIS_URL were added; when
DATABASE_URL is set it wins over the DB_* variables.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flowbuilder.platform.errors import ConfigurationError
from flowbuilder.platform.key_material import password_problem, salt_problem

# Values that mean "somebody copied the example file and never changed it".
_PLACEHOLDERS = frozenset(
    {"changeme", "changethis", "change-me", "secret", "password", "xxx", "todo"}
)

DEFAULT_HOME = Path(".flowbuilder")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # Validate defaults too, so a bad default can never slip through.
        validate_default=True,
    )

    # --- database -----------------------------------------------------------------
    DATABASE_URL: str | None = None
    DB_HOST: str | None = None
    DB_PORT: int = Field(default=5432, ge=1, le=65535)
    DB_NAME: str = "flowbuilder"
    DB_USER: str = "postgres"
    DB_PASSWORD: SecretStr | None = None
    DB_SSL_MODE: str | None = None
    DB_POOL_SIZE: int = Field(default=5, ge=1, le=200)
    DB_MAX_OVERFLOW: int = Field(default=10, ge=0, le=500)
    # Where the embedded default keeps its files (SQLite database, broker folders).
    FLOWBUILDER_HOME: Path = DEFAULT_HOME

    # --- secrets ------------------------------------------------------------------
    USE_DB_SECRETS: bool = True
    SECRET_ENCRYPTION_PASSWORD: SecretStr | None = None
    SECRET_ENCRYPTION_SALT: SecretStr | None = None
    # The previous key, accepted for decryption while `flowbuilder secrets rotate-key` runs.
    SECRET_ENCRYPTION_OLD_PASSWORD: SecretStr | None = None
    SECRET_ENCRYPTION_OLD_SALT: SecretStr | None = None
    # Read ciphertext of the unbound v1 format (written before secrets were bound to their
    # id and owner). True while `flowbuilder secrets rotate-key` moves rows to the bound
    # form; set it to false once rotate-key reports none remaining, so that an old v1
    # ciphertext copied into another row (from a backup, say) is refused.
    SECRET_ACCEPT_V1_CIPHERTEXT: bool = True
    SECRETS_MANAGER_ENDPOINT_URL: str | None = None
    SECRETS_MANAGER_PREFIX: str = "flowbuilder/"

    # --- AWS / SQS ----------------------------------------------------------------
    AWS_REGION: str = "us-east-1"
    SQS_ENDPOINT_URL: str | None = None
    SQS_QUEUE_PREFIX: str = "flowbuilder-"
    # Must exceed the longest allowed execution, or SQS hands a running message to a
    # second worker (the lease then stops it from doing harm, but it is wasted work).
    SQS_VISIBILITY_TIMEOUT: int = Field(default=1800, ge=1, le=43200)
    SQS_WAIT_TIME_SECONDS: int = Field(default=10, ge=0, le=20)
    SQS_DLQ_MAX_RECEIVE_COUNT: int = Field(default=5, ge=1, le=1000)
    BROKER_URL: str | None = None
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    # RedBeat's keys in Redis; several deployments (or test runs) can share one Redis.
    REDBEAT_KEY_PREFIX: str = "redbeat:"
    # The monitoring channel (Celery events and remote control: Flower, `celery inspect`).
    # SQS cannot carry them (no fan-out), so they travel over Redis, apart from the tasks.
    # Unset: REDIS_URL when the broker is SQS, none on the embedded default. "off": none.
    MONITOR_URL: str | None = None
    # Prefix of every Redis key and pub/sub channel of the monitoring channel, so that it
    # never meets RedBeat's keys or another deployment sharing the Redis server.
    MONITOR_KEY_PREFIX: str = Field(default="flowbuilder-monitor:", min_length=1, max_length=100)

    # --- beat (cron workflows) -------------------------------------------------------
    # Beat's Redis lock lives this long unless the active beat renews it (every tick, at
    # most every BEAT_MAX_LOOP_INTERVAL_SECONDS). A standby beat takes over at most
    # BEAT_LOCK_TIMEOUT_SECONDS + BEAT_MAX_LOOP_INTERVAL_SECONDS after the active one dies.
    BEAT_LOCK_TIMEOUT_SECONDS: int = Field(default=30, ge=5, le=3600)
    BEAT_MAX_LOOP_INTERVAL_SECONDS: float = Field(default=5, gt=0, le=300)
    # Cron fires handled per database transaction (and per tick of the loop).
    BEAT_FIRE_BATCH_SIZE: int = Field(default=1000, ge=1, le=10000)
    # run_once: after beat was down, run a missed workflow once and record the fire times
    # it missed. skip: record the missed fires as a skipped run, wait for the next one.
    BEAT_MISSED_FIRE_POLICY: Literal["run_once", "skip"] = "run_once"
    # A fire at most this late is on time, not missed.
    BEAT_MISFIRE_GRACE_SECONDS: float = Field(default=60, ge=0)
    # Full comparison of the Redis schedule with the database (also at start-up, and
    # whenever the schedule key is missing, e.g. after a Redis restart).
    BEAT_RECONCILE_INTERVAL_SECONDS: float = Field(default=300, gt=0)
    # Concurrent SendMessageBatch requests (10 messages each) when a batch fires.
    BEAT_SQS_CONCURRENCY: int = Field(default=8, ge=1, le=64)
    # Update the Redis schedule right after a workflow change commits (publish, cron or
    # time zone change, unpublish, delete). Off: only the reconciliation updates it.
    BEAT_SYNC_ON_CHANGE: bool = True
    # Housekeeping on beat: how often; and execution logs older than this many days are
    # deleted (0: never, the default).
    HOUSEKEEPING_INTERVAL_SECONDS: float = Field(default=3600, gt=0)
    EXECUTION_LOG_RETENTION_DAYS: int = Field(default=0, ge=0)

    # --- execution ----------------------------------------------------------------
    EXECUTION_TIMEOUT_SECONDS: float = Field(default=900, gt=0)
    LEASE_SECONDS: float = Field(default=60, gt=0)
    SWEEP_PENDING_AFTER_SECONDS: float = Field(default=300, gt=0)
    # PostgreSQL: start an enqueue's SQS send as soon as its rows are written (under the
    # enqueue lock), overlapping the caller's COMMIT, instead of after the commit. The
    # message reaches the queue one COMMIT sooner; the caller's process does the send's
    # Python (~2 ms) before its commit returns, and a worker may receive a message whose
    # transaction is still open (it waits for the lock). README, How an execution runs.
    ENQUEUE_SEND_EARLY: bool = False
    # A run whose plan cannot take longer than this (ExecutionPlan.worst_case_seconds,
    # capped by EXECUTION_TIMEOUT_SECONDS) is sent to the short-run queue, which workers
    # may consume with a deeper prefetch: a prefetched message then waits behind short
    # runs only (README, Performance). 0: every run goes to the executions queue.
    SHORT_RUN_MAX_SECONDS: float = Field(default=60, ge=0)
    PHASE_OUTPUT_MAX_BYTES: int = Field(default=256 * 1024, ge=1024)
    # Node outputs nested deeper than this fail the node (nothing downstream could use
    # them, and deep values crash recursive encoders).
    PHASE_OUTPUT_MAX_DEPTH: int = Field(default=64, ge=2, le=500)
    # Every run ends: an execution whose run was interrupted (worker crash, database
    # loss) this many times ends failed, and so does one still unfinished this long
    # after its first start (redeliveries included).
    EXECUTION_MAX_ATTEMPTS: int = Field(default=5, ge=1, le=100)
    EXECUTION_MAX_TOTAL_SECONDS: float = Field(default=3 * 3600, gt=0)
    # Refund the credits of a phase whose node failed (the user paid for nothing).
    REFUND_FAILED_PHASES: bool = True
    RATE_LIMIT_WINDOW_SECONDS: int = Field(default=60, ge=1)
    RATE_LIMIT_USER: int = Field(default=60, ge=0)
    RATE_LIMIT_GUEST: int = Field(default=5, ge=0)
    # Guest creation per client key (the API passes e.g. the client IP): without it the
    # per-guest limits are sidestepped by creating new guests.
    RATE_LIMIT_GUEST_CREATION: int = Field(default=10, ge=0)
    RATE_LIMIT_GUEST_CREATION_WINDOW_SECONDS: int = Field(default=3600, ge=1)
    GUEST_SESSION_TTL_SECONDS: int = Field(default=24 * 3600, ge=60)

    # --- definitions and outbound calls ---------------------------------------------
    MAX_DEFINITION_NODES: int = Field(default=200, ge=1)
    MAX_DEFINITION_BYTES: int = Field(default=512 * 1024, ge=1024)
    # Hosts (or host:port) that outbound nodes may reach although they resolve to
    # loopback or private addresses. Empty in production; tests open 127.0.0.1.
    OUTBOUND_ALLOWLIST: CsvList = Field(default_factory=list)
    HTTP_TIMEOUT_SECONDS: float = Field(default=30, gt=0, le=300)
    HTTP_MAX_RESPONSE_BYTES: int = Field(default=5 * 1024 * 1024, ge=1024)
    HTTP_MAX_REDIRECTS: int = Field(default=5, ge=0, le=20)
    MAX_DELAY_SECONDS: float = Field(default=60, ge=0)
    # extract_text_from_html: bounds on the selector (checked when a definition is
    # validated and when the node runs) and on the HTML it is run against.
    CSS_SELECTOR_MAX_CHARS: int = Field(default=1000, ge=16, le=100_000)
    CSS_SELECTOR_MAX_NESTING: int = Field(default=8, ge=1, le=64)
    CSS_SELECTOR_MAX_SELECTORS: int = Field(default=32, ge=1, le=1000)
    HTML_MAX_BYTES: int = Field(default=5 * 1024 * 1024, ge=1024)
    HTML_MAX_ELEMENTS: int = Field(default=20_000, ge=10)

    # --- logging ------------------------------------------------------------------
    LOG_LEVEL: str = "INFO"
    DEBUG_MODE: bool = False
    LOG_JSON: bool = True

    @field_validator("OUTBOUND_ALLOWLIST", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("LOG_LEVEL")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("DB_SSL_MODE")
    @classmethod
    def _ssl_mode(cls, value: str | None) -> str | None:
        allowed = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
        if value is not None and value not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return value

    # The old key: no placeholder, at least 8 characters (the current key's stronger rule
    # is below).
    @field_validator("SECRET_ENCRYPTION_OLD_PASSWORD", "SECRET_ENCRYPTION_OLD_SALT")
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        if raw.strip().lower() in _PLACEHOLDERS:
            raise ValueError("is a placeholder; set a real random value")
        if len(raw) < 8:
            raise ValueError("is too short (at least 8 characters)")
        return value

    # The current key must be strong (see key_material). The OLD_* key only decrypts while
    # rotate-key moves rows away from it, so a weak old key stays accepted: refusing it
    # would block the very rotation that replaces it.
    @field_validator("SECRET_ENCRYPTION_PASSWORD")
    @classmethod
    def _strong_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (problem := password_problem(value.get_secret_value())):
            raise ValueError(problem)
        return value

    @field_validator("SECRET_ENCRYPTION_SALT")
    @classmethod
    def _strong_salt(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (problem := salt_problem(value.get_secret_value())):
            raise ValueError(problem)
        return value

    @field_validator("DATABASE_URL", "BROKER_URL")
    @classmethod
    def _url_shape(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as scheme://...")
        return value

    @field_validator("SQS_ENDPOINT_URL", "SECRETS_MANAGER_ENDPOINT_URL")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty; unset it to use AWS, or give http(s)://HOST:PORT")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s)://HOST:PORT URL")
        return value

    @field_validator("AWS_REGION")
    @classmethod
    def _region(cls, value: str) -> str:
        # botocore's own check (it would raise deep inside the first AWS call otherwise).
        if not re.fullmatch(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)", value):
            raise ValueError("is not a region name such as us-east-1")
        return value

    @field_validator("REDIS_URL", "MONITOR_URL")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == "off":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// or rediss:// URL")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("has an invalid port") from None
        if not parts.hostname:
            raise ValueError("must name a host, such as redis://HOST:6379/0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError("must end with a database number, such as /0")
        return value

    @model_validator(mode="after")
    def _beat_lock_outlives_ticks(self) -> Settings:
        # The lock is renewed once per tick; it must survive a slow tick or two.
        if self.BEAT_LOCK_TIMEOUT_SECONDS < 3 * self.BEAT_MAX_LOOP_INTERVAL_SECONDS:
            raise ValueError(
                "BEAT_LOCK_TIMEOUT_SECONDS must be at least 3 x BEAT_MAX_LOOP_INTERVAL_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _visibility_above_execution(self) -> Settings:
        if self.SQS_VISIBILITY_TIMEOUT <= self.EXECUTION_TIMEOUT_SECONDS:
            raise ValueError(
                "SQS_VISIBILITY_TIMEOUT must be greater than EXECUTION_TIMEOUT_SECONDS"
            )
        if self.EXECUTION_MAX_TOTAL_SECONDS < self.EXECUTION_TIMEOUT_SECONDS:
            raise ValueError(
                "EXECUTION_MAX_TOTAL_SECONDS must be at least EXECUTION_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _password_not_salt(self) -> Settings:
        password, salt = self.SECRET_ENCRYPTION_PASSWORD, self.SECRET_ENCRYPTION_SALT
        same = (
            password is not None
            and salt is not None
            and password.get_secret_value() == salt.get_secret_value()
        )
        if same:
            raise ValueError("SECRET_ENCRYPTION_PASSWORD must differ from SECRET_ENCRYPTION_SALT")
        return self

    # --- derived values -------------------------------------------------------------
    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: DATABASE_URL, else DB_* (PostgreSQL), else embedded SQLite."""
        if self.DATABASE_URL:
            url = self.DATABASE_URL
            # A bare postgres:// URL (Heroku, RDS docs) means psycopg 3 here.
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        if self.DB_HOST:
            password = self.DB_PASSWORD.get_secret_value() if self.DB_PASSWORD else ""
            auth = quote(self.DB_USER, safe="")
            if password:
                auth += ":" + quote(password, safe="")
            url = f"postgresql+psycopg://{auth}@{self.DB_HOST}:{self.DB_PORT}/{self.DB_NAME}"
            if self.DB_SSL_MODE:
                url += f"?sslmode={self.DB_SSL_MODE}"
            return url
        return f"sqlite:///{(self.FLOWBUILDER_HOME / 'flowbuilder.db').as_posix()}"

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_url(self) -> str:
        """BROKER_URL, or a file-system broker for the embedded default (needs no server)."""
        if self.BROKER_URL:
            return self.BROKER_URL
        return "filesystem://"

    @property
    def monitor_url(self) -> str | None:
        """The Redis URL of the monitoring channel, or None when there is none."""
        if self.MONITOR_URL is not None:
            return None if self.MONITOR_URL.strip().lower() == "off" else self.MONITOR_URL
        if self.broker_url.startswith("sqs://"):
            return self.REDIS_URL
        return None

    @property
    def log_level(self) -> str:
        return "DEBUG" if self.DEBUG_MODE else self.LOG_LEVEL


def _describe(exc: ValidationError) -> str:
    """One line naming each bad variable, never echoing its value (it may be a secret)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid setting " + "; ".join(parts)


def load_settings(**values: Any) -> Settings:
    """Build a Settings object, turning validation errors into one clear line."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


_override: Settings | None = None


@functools.lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def get_settings() -> Settings:
    """The process's settings: read once, cached, replaceable in tests."""
    return _override if _override is not None else _cached()


def reset_settings_cache() -> None:
    _cached.cache_clear()


@contextlib.contextmanager
def override_settings(**changes: Any) -> Iterator[Settings]:
    """Replace the settings for the duration of a block (tests)."""
    global _override
    previous = _override
    base = get_settings()
    data = {name: getattr(base, name) for name in Settings.model_fields}
    data.update(changes)
    _override = Settings.model_validate(data)
    try:
        yield _override
    finally:
        _override = previous
