"""The `flowbuilder` command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "DB_", "BROKER_URL", "SQS_", "FLOWBUILDER_HOME"))
    }
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "flowbuilder", *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_runs_the_main_job_on_the_embedded_default(tmp_path: Path) -> None:
    """The README's main command: SQLite + file-system broker + a real worker."""
    result = _run(["demo"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database: sqlite:///.flowbuilder/flowbuilder.db" in result.stdout
    assert "broker:   filesystem://" in result.stdout
    assert ": completed in " in result.stdout
    assert "read_price" in result.stdout and "'value': '42'" in result.stdout
    assert "balance now 97 credits" in result.stdout
    assert (tmp_path / ".flowbuilder" / "flowbuilder.db").exists()
    # A second run reuses the database and the user: the balance goes on down.
    again = _run(["demo"], tmp_path)
    assert again.returncode == 0 and "balance now 94 credits" in again.stdout


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DB_PORT": "abc"}, "DB_PORT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"SECRET_ENCRYPTION_PASSWORD": "changeme"}, "SECRET_ENCRYPTION_PASSWORD"),
    ],
)
def test_invalid_setting_is_one_clear_line(tmp_path: Path, env: dict, named: str) -> None:
    result = _run(["settings"], tmp_path, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("error: invalid setting")
    assert "changeme" not in result.stderr


def test_settings_masks_secrets(tmp_path: Path) -> None:
    result = _run(
        ["settings"],
        tmp_path,
        SECRET_ENCRYPTION_PASSWORD="a-distinctive-pass-7731",
        DATABASE_URL="postgresql://u:db-pass-5531@127.0.0.1/x",
    )
    assert result.returncode == 0, result.stderr
    assert "a-distinctive-pass-7731" not in result.stdout
    assert "db-pass-5531" not in result.stdout
    assert "postgresql+psycopg://u:***@127.0.0.1/x" in result.stdout


def test_db_upgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = _run(["db", "upgrade"], tmp_path, DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    assert "workflow_execution" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_sqs_ensure_queues_against_moto(tmp_path: Path, moto_server: str) -> None:
    prefix = "clitest-"
    result = _run(
        ["sqs", "ensure-queues"],
        tmp_path,
        SQS_ENDPOINT_URL=moto_server,
        SQS_QUEUE_PREFIX=prefix,
        SQS_VISIBILITY_TIMEOUT="1234",
    )
    assert result.returncode == 0, result.stderr
    assert f"{prefix}executions:" in result.stdout and f"{prefix}executions-dlq:" in result.stdout
    import boto3

    client = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    url = client.get_queue_url(QueueName=f"{prefix}executions")["QueueUrl"]
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "1234" and "executions-dlq" in attrs["RedrivePolicy"]


def test_unknown_command_fails(tmp_path: Path) -> None:
    assert _run(["nope"], tmp_path).returncode != 0


def test_secrets_rotate_key_command(tmp_path: Path) -> None:
    """Secrets written under the old key are re-encrypted by the command and stay readable."""
    from flowbuilder.platform import db, db_secrets
    from flowbuilder.platform.crypto import DatabaseSecretManager
    from flowbuilder.platform.migrate import upgrade
    from flowbuilder.platform.models import DatabaseSecret
    from tests.factories import make_user

    url = f"sqlite:///{tmp_path / 'rot.db'}"
    upgrade(database_url=url)
    old = DatabaseSecretManager("old-password-123", "old-salt-123", old_password="")
    new = DatabaseSecretManager("new-password-456", "new-salt-456", old_password="")
    engine, factory = db.create_engine_and_session(url)
    with factory() as s:
        user = make_user(s)
        for i in range(3):
            db_secrets.create_db_secret(
                session=s, user_id=user.id, name=f"s{i}", value=f"value-{i}", manager=old
            )
        s.commit()
    env = {
        "DATABASE_URL": url,
        "SECRET_ENCRYPTION_PASSWORD": "new-password-456",
        "SECRET_ENCRYPTION_SALT": "new-salt-456",
        "SECRET_ENCRYPTION_OLD_PASSWORD": "old-password-123",
        "SECRET_ENCRYPTION_OLD_SALT": "old-salt-123",
    }
    result = _run(["secrets", "rotate-key", "--batch-size", "2"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "rotated=3 failed=0 remaining=0" in result.stdout
    assert f"key_id={new.key_id}" in result.stdout
    with factory() as s:
        rows = list(s.exec(select(DatabaseSecret).order_by(DatabaseSecret.name)))
        assert {r.key_id for r in rows} == {new.key_id}
        assert [db_secrets.decrypt_row(r, new) for r in rows] == [
            "value-0",
            "value-1",
            "value-2",
        ]
    engine.dispose()
    # Nothing left: a rerun is a no-op.
    again = _run(["secrets", "rotate-key"], tmp_path, **env)
    assert again.returncode == 0 and "rotated=0" in again.stdout
