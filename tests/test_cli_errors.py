"""Every CLI failure exits non-zero with one clear line (subprocesses, real databases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from benchmarks.harness import free_port
from flowbuilder.platform import db

CLEAN_PREFIXES = (
    "DATABASE_URL",
    "DB_",
    "BROKER_URL",
    "SQS_",
    "FLOWBUILDER_HOME",
    "REDIS_URL",
    "MONITOR_",
    "SECRET_ENCRYPTION_OLD",
    "AWS_REGION",
)


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "flowbuilder", *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=180,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line: the last line of stderr, the only one starting with 'error:'."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


# ------------------------------------------------------------------------------ usage


def test_no_arguments_prints_help_not_a_traceback(tmp_path: Path) -> None:
    result = run_cli([], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "Usage: flowbuilder" in result.stdout and "status" in result.stdout


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = run_cli(["--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flowbuilder {version('flowbuilder')}"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["nosuch"], "No such command 'nosuch'"),
        (["secrets", "rotate-key", "--batch-size", "0"], "--batch-size"),
        (["demo", "--timeout", "abc"], "--timeout"),
        (["executions", "show", "not-a-uuid"], "not a UUID"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], named: str) -> None:
    result = run_cli(args, tmp_path)
    assert result.returncode == 2
    assert named in error_line(result)


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_URL": "notaurl"}, "REDIS_URL"),
        ({"MONITOR_URL": "http://x"}, "MONITOR_URL"),
        ({"SQS_ENDPOINT_URL": ""}, "SQS_ENDPOINT_URL"),
        ({"AWS_REGION": "us east 1"}, "AWS_REGION"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, env: dict[str, str], named: str) -> None:
    result = run_cli(["status"], tmp_path, **env)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: invalid setting") and named in line


# ------------------------------------------------------------------------------ database


def test_unreachable_database_names_the_host(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql://postgres:db-pass-4471@127.0.0.1:{port}/flowbuilder"
    result = run_cli(["db", "upgrade"], tmp_path, DATABASE_URL=url)
    assert result.returncode == 3
    line = error_line(result)
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower()
    assert "db-pass-4471" not in result.stderr + result.stdout


def test_wrong_role_is_named(tmp_path: Path) -> None:
    url = "postgresql://no_such_role_x1:role-pass-9912@127.0.0.1:5432/postgres"
    result = run_cli(["executions", "list"], tmp_path, DATABASE_URL=url)
    assert result.returncode == 3
    line = error_line(result)
    assert "no_such_role_x1" in line and "127.0.0.1:5432" in line
    assert "role-pass-9912" not in result.stderr + result.stdout


def test_missing_database_is_named(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/no_such_db_x2"
    result = run_cli(["db", "upgrade"], tmp_path, DATABASE_URL=url)
    assert result.returncode == 3
    assert 'database "no_such_db_x2" does not exist' in error_line(result)


def test_db_upgrade_revisions_on_postgres(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from flowbuilder.platform.migrate import alembic_config
    from tests.conftest import PG_ADMIN_URL

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with db.temporary_database(PG_ADMIN_URL, "flowbuilder_cli") as url:
        unknown = run_cli(["db", "upgrade", "zzz999"], tmp_path, DATABASE_URL=url)
        assert unknown.returncode == 2
        assert "unknown revision 'zzz999'" in error_line(unknown)

        up = run_cli(["db", "upgrade"], tmp_path, DATABASE_URL=url)
        assert up.returncode == 0, up.stderr
        # The revision reached, not the argument given.
        assert up.stdout.strip().endswith(f"is at {head}")

        down_by_upgrade = run_cli(["db", "upgrade", "base"], tmp_path, DATABASE_URL=url)
        assert down_by_upgrade.returncode == 2
        line = error_line(down_by_upgrade)
        assert head in line and "db downgrade base" in line
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                assert (
                    conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
                )
        finally:
            engine.dispose()

        no_yes = run_cli(["db", "downgrade", "base"], tmp_path, DATABASE_URL=url)
        assert no_yes.returncode == 2 and "--yes" in error_line(no_yes)
        down = run_cli(["db", "downgrade", "base", "--yes"], tmp_path, DATABASE_URL=url)
        assert down.returncode == 0, down.stderr
        assert down.stdout.strip().endswith("is at base")
        engine = sa.create_engine(url)
        try:
            assert "workflow_execution" not in sa.inspect(engine).get_table_names()
        finally:
            engine.dispose()


# ------------------------------------------------------------------------------ demo, secrets


def test_demo_that_does_not_finish_fails(tmp_path: Path) -> None:
    result = run_cli(["demo", "--timeout", "0.001"], tmp_path)
    assert result.returncode == 1
    assert "did not finish within" in error_line(result)


def test_demo_has_no_kombu_hostname_warning(tmp_path: Path) -> None:
    result = run_cli(["demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No hostname was supplied" not in result.stderr + result.stdout


ROTATE_ENV = {
    "SECRET_ENCRYPTION_PASSWORD": "new-password-456",
    "SECRET_ENCRYPTION_SALT": "new-salt-456",
}


def test_rotate_key_refuses_without_the_old_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = run_cli(["secrets", "rotate-key"], tmp_path, DATABASE_URL=url, **ROTATE_ENV)
    assert result.returncode == 2
    assert "SECRET_ENCRYPTION_OLD_PASSWORD" in error_line(result)


def test_rotate_key_refuses_a_password_without_a_salt(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = run_cli(
        ["secrets", "rotate-key"],
        tmp_path,
        DATABASE_URL=url,
        SECRET_ENCRYPTION_OLD_PASSWORD="old-password-123",
        **ROTATE_ENV,
    )
    assert result.returncode == 2
    line = error_line(result)
    assert "SECRET_ENCRYPTION_OLD_SALT" in line and "old-password-123" not in result.stderr


def test_rotate_key_with_undecryptable_rows_fails(tmp_path: Path) -> None:
    from flowbuilder.platform import db_secrets as db_secret_crud
    from flowbuilder.platform.crypto import DatabaseSecretManager
    from flowbuilder.platform.migrate import upgrade
    from tests.factories import make_user

    url = f"sqlite:///{tmp_path / 'rot.db'}"
    upgrade(database_url=url)
    stranger = DatabaseSecretManager("third-password-789", "third-salt-789", old_password="")
    engine, factory = db.create_engine_and_session(url)
    with factory() as s:
        user = make_user(s)
        db_secret_crud.create_db_secret(
            session=s, user_id=user.id, name="x", value="v", manager=stranger
        )
        s.commit()
    engine.dispose()
    result = run_cli(
        ["secrets", "rotate-key"],
        tmp_path,
        DATABASE_URL=url,
        SECRET_ENCRYPTION_OLD_PASSWORD="old-password-123",
        SECRET_ENCRYPTION_OLD_SALT="old-salt-123",
        **ROTATE_ENV,
    )
    assert result.returncode == 1
    assert "rotated=0 failed=1" in result.stdout
    assert "could not be decrypted" in error_line(result)


# ------------------------------------------------------------------------------ sweep, logs


def test_sweep_reports_failed_sends(tmp_path: Path) -> None:
    """A stale execution whose re-send fails is reported as not sent, status 1."""
    from datetime import timedelta

    from flowbuilder.platform.migrate import upgrade
    from flowbuilder.platform.models import WorkflowExecution, utcnow
    from tests.factories import make_user

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(database_url=url)
    engine, factory = db.create_engine_and_session(url)
    with factory() as s:
        user = make_user(s)
        s.add(
            WorkflowExecution(
                user_id=user.id,
                created_at=utcnow() - timedelta(hours=1),
                enqueued_at=utcnow() - timedelta(hours=1),
                resend_after=utcnow() - timedelta(minutes=55),
            )
        )
        s.commit()
    engine.dispose()
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        ["sweep"],
        tmp_path,
        DATABASE_URL=url,
        BROKER_URL="sqs://",
        SQS_ENDPOINT_URL=dead,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "re-sent 0 of 1 stale executions" in result.stdout
    assert "1 sends failed" in error_line(result)


@pytest.mark.parametrize("json_logs", [True, False])
def test_cli_logging_honours_log_json(tmp_path: Path, moto_server: str, json_logs: bool) -> None:
    import json

    result = run_cli(
        ["sqs", "ensure-queues"],
        tmp_path,
        SQS_ENDPOINT_URL=moto_server,
        SQS_QUEUE_PREFIX=f"clilog{int(json_logs)}-",
        LOG_JSON=str(json_logs).lower(),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "sqs_queue" in line]
    assert lines, result.stderr
    for line in lines:
        if json_logs:
            assert json.loads(line)["event"].startswith("sqs_queue")
        else:
            assert not line.startswith("{")


def test_unmigrated_database_says_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_cli(["executions", "list"], tmp_path, DATABASE_URL=url)
    assert result.returncode == 2
    line = error_line(result)
    assert "no such table" in line and "flowbuilder db upgrade" in line
