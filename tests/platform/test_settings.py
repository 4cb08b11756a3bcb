"""Settings: defaults, precedence, derived URLs, one-line errors that never echo secrets."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import sqlalchemy as sa

from flowbuilder.platform.errors import ConfigurationError
from flowbuilder.platform.settings import (
    Settings,
    get_settings,
    load_settings,
    override_settings,
    reset_settings_cache,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No flowbuilder variable in the environment and no ``.env`` in the working directory."""
    fields = {name.upper() for name in Settings.model_fields}
    for key in list(os.environ):
        if key.upper() in fields:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> ConfigurationError:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings()
    return excinfo.value


# ------------------------------------------------------------------------------ defaults


def test_defaults_are_embedded_sqlite_and_filesystem_broker(clean_env: Path) -> None:
    s = load_settings()
    assert s.DATABASE_URL is None and s.DB_HOST is None
    assert s.database_url == "sqlite:///.flowbuilder/flowbuilder.db"
    assert s.is_embedded
    assert s.broker_url == "filesystem://"
    assert s.SECRET_ENCRYPTION_PASSWORD is None
    assert s.OUTBOUND_ALLOWLIST == []
    assert s.LOG_LEVEL == "INFO"


def test_embedded_database_lives_under_flowbuilder_home(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = clean_env / "home"
    monkeypatch.setenv("FLOWBUILDER_HOME", str(home))
    s = load_settings()
    assert Path(s.FLOWBUILDER_HOME) == home
    assert s.database_url == f"sqlite:///{(home / 'flowbuilder.db').as_posix()}"
    assert s.is_embedded


# ------------------------------------------------------------------------------ database URL


def test_database_url_wins_over_db_variables(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app@db.example:6432/main")
    monkeypatch.setenv("DB_HOST", "ignored.example")
    monkeypatch.setenv("DB_NAME", "ignored")
    s = load_settings()
    assert s.database_url == "postgresql+psycopg://app@db.example:6432/main"
    assert not s.is_embedded


def test_db_variables_build_a_psycopg_url_with_quoted_password_and_sslmode(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_HOST", "db.internal")
    monkeypatch.setenv("DB_PORT", "6543")
    monkeypatch.setenv("DB_NAME", "flows")
    monkeypatch.setenv("DB_USER", "svc user")
    monkeypatch.setenv("DB_PASSWORD", "p@ss:w/rd#1?&")
    monkeypatch.setenv("DB_SSL_MODE", "verify-full")
    s = load_settings()
    assert s.database_url == (
        "postgresql+psycopg://svc%20user:p%40ss%3Aw%2Frd%231%3F%26@db.internal:6543/flows"
        "?sslmode=verify-full"
    )
    # The quoted URL parses back to the original password.
    url = sa.make_url(s.database_url)
    assert url.password == "p@ss:w/rd#1?&"
    assert url.username == "svc user"
    assert url.query == {"sslmode": "verify-full"}


def test_db_variables_without_password_or_sslmode(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_HOST", "localhost")
    s = load_settings()
    assert s.database_url == "postgresql+psycopg://postgres@localhost:5432/flowbuilder"


@pytest.mark.parametrize("scheme", ["postgres://", "postgresql://"])
def test_bare_postgres_urls_become_psycopg(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"{scheme}u:pw@h:5432/d?sslmode=require")
    assert load_settings().database_url == "postgresql+psycopg://u:pw@h:5432/d?sslmode=require"


def test_broker_url_is_used_when_set(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "sqs://")
    assert load_settings().broker_url == "sqs://"


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DB_PORT": "abc"}, "DB_PORT"),
        ({"DB_PORT": "70000"}, "DB_PORT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"DB_SSL_MODE": "bogus"}, "DB_SSL_MODE"),
        ({"LOG_JSON": "maybe"}, "LOG_JSON"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        (
            {"SQS_VISIBILITY_TIMEOUT": "900", "EXECUTION_TIMEOUT_SECONDS": "900"},
            "SQS_VISIBILITY_TIMEOUT",
        ),
        (
            {"EXECUTION_MAX_TOTAL_SECONDS": "60", "EXECUTION_TIMEOUT_SECONDS": "120"},
            "EXECUTION_MAX_TOTAL_SECONDS",
        ),
        ({"EXECUTION_MAX_ATTEMPTS": "0"}, "EXECUTION_MAX_ATTEMPTS"),
        ({"PHASE_OUTPUT_MAX_DEPTH": "1"}, "PHASE_OUTPUT_MAX_DEPTH"),
        ({"SECRET_ENCRYPTION_PASSWORD": "changeme"}, "SECRET_ENCRYPTION_PASSWORD"),
        ({"SECRET_ENCRYPTION_SALT": "Password"}, "SECRET_ENCRYPTION_SALT"),
    ],
)
def test_invalid_value_is_one_line_naming_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    err = _config_error(monkeypatch, **env)
    message = str(err)
    assert "\n" not in message
    assert variable in message
    assert message.startswith("invalid setting ")


def test_several_invalid_values_are_all_named_on_one_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = str(_config_error(monkeypatch, DB_PORT="abc", LOG_LEVEL="LOUD"))
    assert "\n" not in message
    assert "DB_PORT" in message and "LOG_LEVEL" in message


@pytest.mark.parametrize(
    "variable",
    [
        "SECRET_ENCRYPTION_PASSWORD",
        "SECRET_ENCRYPTION_SALT",
        "SECRET_ENCRYPTION_OLD_PASSWORD",
        "SECRET_ENCRYPTION_OLD_SALT",
    ],
)
def test_invalid_secret_value_is_never_echoed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    secret = "s3cr"  # too short: invalid, and distinctive enough to search for
    err = _config_error(monkeypatch, **{variable: secret})
    message = str(err)
    assert variable in message
    assert "too short" in message
    assert secret not in message
    assert secret not in repr(err)
    # The pydantic error (which carries the input) is not chained into the traceback.
    assert err.__cause__ is None and err.__suppress_context__
    assert secret not in "".join(traceback.format_exception(err))


def test_valid_secrets_are_kept_secret(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_ENCRYPTION_PASSWORD", "a-long-and-random-password")
    monkeypatch.setenv("DB_PASSWORD", "db-password-value")
    s = load_settings()
    assert s.SECRET_ENCRYPTION_PASSWORD is not None
    assert s.SECRET_ENCRYPTION_PASSWORD.get_secret_value() == "a-long-and-random-password"
    assert "a-long-and-random-password" not in repr(s)
    assert "db-password-value" not in repr(s)


# ------------------------------------------------------------------------------ parsing


def test_outbound_allowlist_parses_comma_separated_values(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOUND_ALLOWLIST", " 127.0.0.1:8080, localhost ,,10.0.0.5 ")
    assert load_settings().OUTBOUND_ALLOWLIST == ["127.0.0.1:8080", "localhost", "10.0.0.5"]


def test_outbound_allowlist_accepts_a_list_in_code(clean_env: Path) -> None:
    assert load_settings(OUTBOUND_ALLOWLIST=["a", "b"]).OUTBOUND_ALLOWLIST == ["a", "b"]


def test_debug_mode_forces_debug_log_level(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "warning")
    s = load_settings()
    assert s.LOG_LEVEL == "WARNING" and s.log_level == "WARNING"
    monkeypatch.setenv("DEBUG_MODE", "true")
    assert load_settings().log_level == "DEBUG"


def test_dotenv_file_is_read_and_environment_wins(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / ".env").write_text(
        "DATABASE_URL=postgres://dotenv@db.example:5432/fromfile\n"
        "LOG_LEVEL=error\n"
        "OUTBOUND_ALLOWLIST=one,two\n",
        encoding="utf-8",
    )
    s = load_settings()
    assert s.database_url == "postgresql+psycopg://dotenv@db.example:5432/fromfile"
    assert s.LOG_LEVEL == "ERROR"
    assert s.OUTBOUND_ALLOWLIST == ["one", "two"]

    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings().LOG_LEVEL == "DEBUG"


def test_invalid_value_in_dotenv_is_reported(clean_env: Path) -> None:
    (clean_env / ".env").write_text("DB_PORT=abc\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="DB_PORT"):
        load_settings()


# ------------------------------------------------------------------------------ caching


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch):
    """Start and end with an empty settings cache (the environment is restored after)."""
    reset_settings_cache()
    yield
    reset_settings_cache()


def test_get_settings_is_cached_until_reset(
    fresh_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    first = get_settings()
    assert first.LOG_LEVEL == "WARNING"
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    assert get_settings() is first
    assert get_settings().LOG_LEVEL == "WARNING"

    reset_settings_cache()
    again = get_settings()
    assert again is not first
    assert again.LOG_LEVEL == "ERROR"


def test_override_settings_applies_inside_the_block_only(fresh_cache: None) -> None:
    base = get_settings()
    with override_settings(LOG_LEVEL="debug", MAX_DEFINITION_NODES=7) as overridden:
        assert get_settings() is overridden
        assert overridden is not base
        assert overridden.LOG_LEVEL == "DEBUG"  # validated like any other value
        assert overridden.MAX_DEFINITION_NODES == 7
        # Everything not overridden is carried over.
        assert overridden.database_url == base.database_url
        assert overridden.SECRET_ENCRYPTION_PASSWORD == base.SECRET_ENCRYPTION_PASSWORD
        with override_settings(MAX_DEFINITION_NODES=9) as inner:
            assert get_settings() is inner
            assert inner.MAX_DEFINITION_NODES == 9
            assert inner.LOG_LEVEL == "DEBUG"
        assert get_settings() is overridden
    assert get_settings() is base
    assert base.MAX_DEFINITION_NODES != 7


def test_override_settings_restores_after_an_exception(fresh_cache: None) -> None:
    base = get_settings()
    with pytest.raises(RuntimeError), override_settings(MAX_DEFINITION_NODES=3):
        raise RuntimeError("boom")
    assert get_settings() is base


# ------------------------------------------------------------------ key material (issue 11)

_GOOD_SALT = "a-deployment-salt-5e1d"


@pytest.mark.parametrize(
    "password",
    [
        "12345678",
        "aaaaaaaa",
        "password1",
        "changeme1",
        "secret123",
        "aaaaaaaaaaaaaaaaaaaaaaaa",  # long, but one character
        "abcdefghijklmnopqrstuvwxyz",  # long, but a run
        "Password123!Password123!",  # a repetition of weak words
        "changeme-changeme-2024!!",  # only weak words, digits and punctuation
        "qwertyuiopasdfghjkl",  # keyboard rows
        "x7#Kq2!",  # random-looking but short
    ],
)
def test_weak_encryption_password_is_refused_at_load(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    err = _config_error(
        monkeypatch, SECRET_ENCRYPTION_PASSWORD=password, SECRET_ENCRYPTION_SALT=_GOOD_SALT
    )
    message = str(err)
    assert "\n" not in message and "SECRET_ENCRYPTION_PASSWORD" in message
    assert "secrets.token_urlsafe(32)" in message  # says how to make good material
    assert password not in message


def test_password_equal_to_salt_is_refused(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = "Zq8-vT3m_Lk2pW9x-Rb7"
    err = _config_error(monkeypatch, SECRET_ENCRYPTION_PASSWORD=value, SECRET_ENCRYPTION_SALT=value)
    assert "must differ from SECRET_ENCRYPTION_SALT" in str(err) and value not in str(err)


@pytest.mark.parametrize("salt", ["short", "aaaaaaaaaaaa", "abababababab"])
def test_weak_salt_is_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch, salt: str) -> None:
    err = _config_error(
        monkeypatch, SECRET_ENCRYPTION_PASSWORD="Zq8-vT3m_Lk2pW9x-Rb7", SECRET_ENCRYPTION_SALT=salt
    )
    assert "SECRET_ENCRYPTION_SALT" in str(err)


def test_generated_material_and_the_test_values_are_accepted(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets as pysecrets

    for _ in range(20):
        monkeypatch.setenv("SECRET_ENCRYPTION_PASSWORD", pysecrets.token_urlsafe(32))
        monkeypatch.setenv("SECRET_ENCRYPTION_SALT", pysecrets.token_urlsafe(16))
        load_settings()
    monkeypatch.setenv("SECRET_ENCRYPTION_PASSWORD", "test-encryption-password-4f1c")
    monkeypatch.setenv("SECRET_ENCRYPTION_SALT", "test-encryption-salt-9b2e")
    load_settings()


def test_a_weak_old_key_is_still_accepted_for_rotating_away_from_it(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_ENCRYPTION_PASSWORD", "Zq8-vT3m_Lk2pW9x-Rb7")
    monkeypatch.setenv("SECRET_ENCRYPTION_SALT", _GOOD_SALT)
    monkeypatch.setenv("SECRET_ENCRYPTION_OLD_PASSWORD", "oldpass1")
    monkeypatch.setenv("SECRET_ENCRYPTION_OLD_SALT", "oldsalt1")
    assert load_settings().SECRET_ENCRYPTION_OLD_PASSWORD is not None


def test_undecodable_key_material_is_refused(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Undecodable environment bytes arrive as lone surrogates (surrogateescape)."""
    err = _config_error(
        monkeypatch,
        SECRET_ENCRYPTION_PASSWORD="Zq8-vT3m_Lk2pW9x-Rb7\udcff",
        SECRET_ENCRYPTION_SALT=_GOOD_SALT,
    )
    assert "SECRET_ENCRYPTION_PASSWORD" in str(err) and "Unicode" in str(err)
