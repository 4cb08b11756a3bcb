"""Operator commands as subprocesses: credits, run --wait, executions, status.

On PostgreSQL (a throwaway database) with the file-system broker and a real worker
process, like `flowbuilder demo` but across processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowbuilder.platform import db
from tests.conftest import PG_ADMIN_URL
from tests.tasks.conftest import wait_for
from tests.test_cli_errors import error_line, run_cli

pytestmark = pytest.mark.integration

DEFINITION = {
    "version": 1,
    "nodes": [
        {
            "id": "extract",
            "type": "extract_text_from_html",
            "inputs": {"html": "<p class='x'>7</p>", "selector": "p.x"},
        },
        {
            "id": "wrap",
            "type": "add_property_to_json",
            "inputs": {"json": {}, "property_path": "x"},
        },
    ],
    "edges": [
        {"source": "extract", "sourceHandle": "text", "target": "wrap", "targetHandle": "value"}
    ],
}


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with db.temporary_database(PG_ADMIN_URL, "flowbuilder_cliops") as url:
        yield url


@pytest.fixture
def env(pg_database: str, tmp_path: Path) -> dict[str, str]:
    values = {"DATABASE_URL": pg_database, "LOG_JSON": "true"}
    result = run_cli(["db", "upgrade"], tmp_path, **values)
    assert result.returncode == 0, result.stderr
    return values


def _start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    from tests.test_cli_errors import CLEAN_PREFIXES

    full = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}
    full.update(env, PYTHONUNBUFFERED="1")
    log = open(cwd / "worker.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "flowbuilder.tasks",
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=cli{uuid.uuid4().hex[:6]}@test",
        ],
        cwd=cwd,
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(
        lambda: (
            " ready." in (cwd / "worker.log").read_text(errors="replace") or proc.poll() is not None
        ),
        60,
    )
    assert proc.poll() is None, (cwd / "worker.log").read_text()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_operator_commands(env: dict[str, str], tmp_path: Path) -> None:
    email = f"ops-{uuid.uuid4().hex[:6]}@example.com"
    missing = run_cli(["credits", "show", email], tmp_path, **env)
    assert missing.returncode == 2 and "not found" in error_line(missing)

    granted = run_cli(["credits", "grant", email, "50", "--create", "--key", "g1"], tmp_path, **env)
    assert granted.returncode == 0, granted.stderr
    assert "granted 50; balance 50 credits" in granted.stdout
    again = run_cli(["credits", "grant", email, "50", "--key", "g1"], tmp_path, **env)
    assert again.returncode == 0 and "balance 50 credits" in again.stdout  # idempotent

    definition = tmp_path / "wf.json"
    definition.write_text(json.dumps({"name": "ops-wf", "definition": DEFINITION}))
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    not_json = run_cli(["run", str(bad), "--user", email], tmp_path, **env)
    assert not_json.returncode == 2 and "not JSON" in error_line(not_json)

    worker = _start_worker(env, tmp_path)
    try:
        ran = run_cli(
            ["run", str(definition), "--user", email, "--wait", "--timeout", "90"], tmp_path, **env
        )
    finally:
        _stop(worker)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    execution_id = ran.stdout.split("execution ", 1)[1].split()[0]
    assert "phase 1 extract: completed" in ran.stdout
    assert "phase 2 wrap: completed" in ran.stdout
    assert f"execution {execution_id}: completed" in ran.stdout

    shown = run_cli(["credits", "show", email], tmp_path, **env)
    assert shown.returncode == 0, shown.stderr
    assert "balance 48 credits" in shown.stdout
    assert "grant" in shown.stdout and "debit" in shown.stdout and execution_id in shown.stdout

    listed = run_cli(["executions", "list", "--user", email], tmp_path, **env)
    assert listed.returncode == 0 and execution_id in listed.stdout and "completed" in listed.stdout

    details = run_cli(["executions", "show", execution_id], tmp_path, **env)
    assert details.returncode == 0, details.stderr
    assert "extract_text_from_html" in details.stdout and "add_property_to_json" in details.stdout
    other = run_cli(
        ["executions", "show", execution_id, "--user", "nobody@example.com"], tmp_path, **env
    )
    assert other.returncode == 2 and "not found" in error_line(other)

    # No worker now: the run stays pending, and cancelling ends it at once.
    queued = run_cli(
        ["run", str(definition), "--user", email, "--name", "ops-wf-2"], tmp_path, **env
    )
    assert queued.returncode == 0, queued.stderr
    pending_id = queued.stdout.split("execution ", 1)[1].split()[0]
    cancelled = run_cli(["executions", "cancel", pending_id], tmp_path, **env)
    assert cancelled.returncode == 0 and f"execution {pending_id} cancelled" in cancelled.stdout
    unknown = run_cli(["executions", "cancel", str(uuid.uuid4())], tmp_path, **env)
    assert unknown.returncode == 2 and "not found" in error_line(unknown)

    status = run_cli(["status"], tmp_path, **env)
    assert status.returncode == 0, status.stderr
    assert "no monitoring channel" in status.stderr
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in status.stdout.splitlines()
        if line.count("│") == 3
    }
    assert rows.get("completed") == "1" and rows.get("cancelled") == "1", status.stdout
