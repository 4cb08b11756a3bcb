"""docker-compose.yml, Dockerfile and Procfile: parsed (no Docker engine here) and checked
against the package they start, so a renamed module or scheduler breaks a test, not a deploy.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import yaml
from celery import Celery
from celery.app.utils import find_app
from celery.beat import Scheduler
from celery.utils.imports import symbol_by_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROCFILE = ROOT / "Procfile"
PROCFILE_DEV = ROOT / "Procfile.dev"
PYPROJECT = ROOT / "pyproject.toml"

APP_SERVICES = ("migrate", "worker", "worker-short", "beat", "flower")
CELERY_SERVICES = ("worker", "worker-short", "beat", "flower")
SHORT_WORKER = [
    "celery",
    "-A",
    "flowbuilder.tasks",
    "worker",
    "--loglevel=INFO",
    "--hostname=worker-short@%h",
    "--queues=executions-short",
    "--prefetch-multiplier=4",
]
# Throwaway values that only work against the containers of the compose file itself.
LOCAL_DUMMIES = {"testing", "postgres"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|SALT|TOKEN|KEY)$", re.I)
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):\?[^}]+\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _option(argv: list[str], short: str, long: str) -> str:
    for i, arg in enumerate(argv):
        if arg in (short, long):
            return argv[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{short}/{long} missing from {argv}")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _procfile(path: Path = PROCFILE) -> dict[str, str]:
    processes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            assert re.fullmatch(r"[a-z][a-z0-9_-]*", name), line
            assert name not in processes, f"duplicate process {name}"
            processes[name] = command.strip()
    return processes


def _check_celery_command(argv: list[str]) -> Celery:
    """``celery -A MODULE ...`` names an importable module holding our Celery app."""
    assert argv[0] == "celery", argv
    module = _option(argv, "-A", "--app")
    assert module == "flowbuilder.tasks"
    app = find_app(module)  # what `celery -A` itself does
    assert isinstance(app, Celery)
    assert app.main == "flowbuilder"
    if "beat" in argv:
        # No -S: the app's beat_scheduler (RedBeat + cron workflows) is used; a -S would
        # replace it and no user's cron workflow would ever run.
        assert "-S" not in argv and not any(a.startswith("--scheduler") for a in argv), argv
        scheduler = symbol_by_name(app.conf.beat_scheduler)
        assert issubclass(scheduler, Scheduler)
    return app


# ------------------------------------------------------------------------------ compose


def test_compose_has_the_services(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", "moto", *APP_SERVICES}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["moto"]["image"] == "motoserver/moto:5"
    assert "5000:5000" in services["moto"]["ports"]
    assert "pg_isready" in " ".join(_argv(services["postgres"]["healthcheck"]["test"]))


def test_app_services_build_the_image(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        assert services[name]["build"] == ".", name
    assert DOCKERFILE.is_file()


def test_compose_commands(services: dict[str, Any]) -> None:
    # The one-shot job migrates, then creates the queue with its dead-letter queue.
    migrate = _argv(services["migrate"]["command"])
    assert migrate[:2] == ["sh", "-c"]
    assert [shlex.split(part) for part in migrate[2].split("&&")] == [
        ["flowbuilder", "db", "upgrade"],
        ["flowbuilder", "sqs", "ensure-queues"],
    ]
    worker = _argv(services["worker"]["command"])
    assert worker[:4] == ["celery", "-A", "flowbuilder.tasks", "worker"]
    assert "--loglevel=INFO" in worker
    assert "--hostname=worker@%h" in worker
    # Every queue (no -Q), one message per process at a time.
    assert not any(a.startswith(("-Q", "--queues", "--prefetch")) for a in worker)
    assert _argv(services["worker-short"]["command"]) == SHORT_WORKER
    from flowbuilder.tasks.app import SHORT_EXECUTIONS_QUEUE, app

    # The queue the app routes short runs to, and one a default worker reads too.
    assert f"--queues={SHORT_EXECUTIONS_QUEUE}" in SHORT_WORKER
    assert SHORT_EXECUTIONS_QUEUE in {q.name for q in app.conf.task_queues}
    beat = _argv(services["beat"]["command"])
    assert beat[:4] == ["celery", "-A", "flowbuilder.tasks", "beat"]
    assert "-S" not in beat and not any(a.startswith("--scheduler") for a in beat)
    flower = _argv(services["flower"]["command"])
    assert flower[:4] == ["celery", "-A", "flowbuilder.tasks", "flower"]
    assert _option(flower, "-p", "--port") == "5555"
    assert "5555:5555" in services["flower"]["ports"]
    for name in CELERY_SERVICES:
        _check_celery_command(_argv(services[name]["command"]))


def test_compose_dependencies(services: dict[str, Any]) -> None:
    assert _depends(services["migrate"]) == {
        "postgres": "service_healthy",
        "moto": "service_healthy",
    }
    for name in CELERY_SERVICES:
        deps = _depends(services[name])
        assert deps == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "moto": "service_healthy",
            "migrate": "service_completed_successfully",
        }, name
    # migrate runs once and stops; it must not be restarted forever.
    assert services["migrate"].get("restart", "no") == "no"
    # Every dependency is a service of the file.
    for name, service in services.items():
        assert set(_depends(service)) <= set(services), name


def test_celery_services_share_the_env_anchor(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert re.search(r"^x-flowbuilder-env: &\S+", text, re.M)
    shared = {k: str(v) for k, v in compose["x-flowbuilder-env"].items()}
    for name in ("migrate", "worker", "worker-short", "beat"):
        assert _env(services[name]) == shared, name
    # Flower: the same, plus its authentication (never in the other containers).
    flower = _env(services["flower"])
    assert {k: v for k, v in flower.items() if not k.startswith("FLOWER_")} == shared
    assert set(flower) - set(shared) == {"FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"}
    match = REQUIRED_VAR.match(flower["FLOWER_BASIC_AUTH"])
    assert match and match["name"] == "FLOWER_BASIC_AUTH"
    assert flower["FLOWER_UNAUTHENTICATED_API"] == "false"


def test_healthchecks_on_every_long_running_service(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name == "migrate":
            assert "healthcheck" not in service
            continue
        test = _argv(service["healthcheck"]["test"])
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    worker = " ".join(_argv(services["worker"]["healthcheck"]["test"]))
    # Remote control on the monitoring channel, addressed to this container's worker
    # (`$$` is compose's escape for the shell's `$`).
    assert "celery -A flowbuilder.tasks inspect ping" in worker
    assert "-d worker@$${HOSTNAME}" in worker
    short = " ".join(_argv(services["worker-short"]["healthcheck"]["test"]))
    assert "-d worker-short@$${HOSTNAME}" in short
    beat = _argv(services["beat"]["healthcheck"]["test"])
    assert beat[1:] == ["python", "-m", "flowbuilder.tasks.health", "beat"]
    flower = " ".join(_argv(services["flower"]["healthcheck"]["test"]))
    assert "http://localhost:5555/healthcheck" in flower
    assert "moto-api" in " ".join(_argv(services["moto"]["healthcheck"]["test"]))


def test_beat_healthcheck_reads_the_redbeat_lock(tmp_path: Path) -> None:
    """`python -m flowbuilder.tasks.health beat` against the real Redis: unhealthy until
    RedBeat's lock key `<REDBEAT_KEY_PREFIX>:lock` exists."""
    import os

    import redis

    prefix = f"fbtest-health-{uuid.uuid4().hex[:8]}:"
    env = dict(os.environ, REDBEAT_KEY_PREFIX=prefix, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "flowbuilder.tasks.health", "beat"]
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        missing = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert missing.returncode == 1 and f"{prefix}:lock missing" in missing.stdout
        client.set(f"{prefix}:lock", "x", ex=60)
        held = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert held.returncode == 0 and f"{prefix}:lock held" in held.stdout
    finally:
        client.delete(f"{prefix}:lock")
        client.close()


def test_worker_environment(services: dict[str, Any]) -> None:
    env = _env(services["worker"])
    assert env["DATABASE_URL"] == "postgresql+psycopg://postgres:postgres@postgres:5432/flowbuilder"
    assert env["BROKER_URL"] == "sqs://"
    assert env["SQS_ENDPOINT_URL"] == "http://moto:5000"
    assert env["AWS_REGION"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["USE_DB_SECRETS"] == "true"
    # Host names in the URLs are services of the file.
    for key in ("DATABASE_URL", "SQS_ENDPOINT_URL", "SECRETS_MANAGER_ENDPOINT_URL", "REDIS_URL"):
        assert urlsplit(env[key]).hostname in services, key


def test_no_literal_secrets(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name in ("SECRET_ENCRYPTION_PASSWORD", "SECRET_ENCRYPTION_SALT"):
        value = str(compose["x-flowbuilder-env"][name])
        match = REQUIRED_VAR.match(value)
        assert match and match["name"] == name, f"{name} must be ${{{name}:?...}}, not {value!r}"
    for service_name, service in services.items():
        for key, value in _env(service).items():
            where = f"{service_name}.{key}"
            if key.endswith("_URL"):
                # A password inside a URL is a local dummy too.
                password = urlsplit(value).password
                assert password is None or password in LOCAL_DUMMIES, where
            elif SECRET_NAME.search(key):
                assert REQUIRED_VAR.match(value) or value in LOCAL_DUMMIES, where


def test_compose_environment_is_valid_for_the_app(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the secrets supplied, the worker's environment loads and points Celery at moto."""
    from flowbuilder.platform.settings import load_settings
    from flowbuilder.tasks.app import broker_url, transport_options

    monkeypatch.chdir(tmp_path)  # no .env
    for key, value in _env(services["worker"]).items():
        if match := REQUIRED_VAR.match(value):
            value = f"value-of-{match['name'].lower()}"
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.USE_DB_SECRETS is True
    assert broker_url(settings) == "sqs://moto:5000"
    assert transport_options(settings)["is_secure"] is False


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    # migrations/ must sit beside the package for `flowbuilder db upgrade`.
    assert re.search(r"^COPY migrations ", text, re.M)
    assert re.search(r"^COPY .*alembic\.ini", text, re.M)
    assert re.search(r"^ARG EXTRAS=flower$", text, re.M)
    assert 'pip install -e ".${EXTRAS:+[$EXTRAS]}"' in text
    # Never copy the whole context (a developer's .env or database would go in).
    assert not re.search(r"^COPY \. ", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


# ------------------------------------------------------------------------------ Procfile


def test_procfile_processes() -> None:
    processes = _procfile()
    assert processes == {
        "release": "flowbuilder db upgrade && flowbuilder sqs ensure-queues",
        "worker": "celery -A flowbuilder.tasks worker --loglevel=INFO --hostname=worker@%h",
        "worker-short": " ".join(SHORT_WORKER),
        "beat": "celery -A flowbuilder.tasks beat --loglevel=INFO",
        "flower": "celery -A flowbuilder.tasks flower --port=$PORT",
    }


def test_procfile_dev_runs_with_honcho_without_release() -> None:
    """`honcho -f Procfile.dev start`: the long-running processes only (honcho would run
    `release` as a process that exits, which stops all the others)."""
    from honcho.environ import parse_procfile

    dev = parse_procfile(PROCFILE_DEV.read_text(encoding="utf-8")).processes
    assert set(dev) == {"worker", "worker-short", "beat", "flower"}
    production = _procfile()
    for name, command in dev.items():
        assert command == production[name], name
    assert "flowbuilder db upgrade && flowbuilder sqs ensure-queues" in PROCFILE_DEV.read_text()


def test_procfile_celery_modules_exist() -> None:
    import flowbuilder.tasks

    for name in ("worker", "worker-short", "beat", "flower"):
        app = _check_celery_command(shlex.split(_procfile()[name]))
        assert app is flowbuilder.tasks.app is flowbuilder.tasks.celery


def test_dependencies() -> None:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert {"kombu", "celery-redbeat", "celery", "redis"} <= names
    assert "flower" not in names  # only where Flower runs
    assert any(d.startswith("flower") for d in project["optional-dependencies"]["flower"])


def test_redbeat_scheduler_imports() -> None:
    from redbeat import RedBeatScheduler

    from flowbuilder.beat.scheduler import FlowBuilderScheduler

    conf = find_app("flowbuilder.tasks").conf
    assert symbol_by_name(conf.beat_scheduler) is FlowBuilderScheduler
    assert issubclass(FlowBuilderScheduler, RedBeatScheduler)
    assert conf.redbeat_redis_url and conf.redbeat_redis_options
    # Not RedBeat's 1,500 s default: a standby beat takes over within seconds.
    assert conf.redbeat_lock_timeout == 30 and conf.beat_max_loop_interval == 5


def _release_steps() -> list[list[str]]:
    return [shlex.split(part) for part in _procfile()["release"].split("&&")]


def test_release_command_is_the_installed_cli() -> None:
    for argv in _release_steps():
        [ep] = entry_points(group="console_scripts", name=argv[0])
        assert ep.value == "flowbuilder.cli:main"


def test_release_command_upgrades_the_database_and_creates_the_queues(
    tmp_path: Path, moto_server: str
) -> None:
    if importlib.util.find_spec("flowbuilder.cli") is None:
        pytest.skip("flowbuilder.cli is not written yet")
    url = f"sqlite:///{(tmp_path / 'release.db').as_posix()}"
    prefix = f"release-{uuid.uuid4().hex[:6]}-"
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": url,
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "BROKER_URL": "sqs://",
        "SQS_ENDPOINT_URL": moto_server,
        "SQS_QUEUE_PREFIX": prefix,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    for argv in _release_steps():
        code = f"import sys; from flowbuilder.cli import main; sys.argv[1:] = {argv[1:]!r}; main()"
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    engine = sa.create_engine(url)
    try:
        assert "alembic_version" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    import boto3

    client = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue = client.get_queue_url(QueueName=f"{prefix}executions")["QueueUrl"]
    attrs = client.get_queue_attributes(QueueUrl=queue, AttributeNames=["RedrivePolicy"])
    assert f"{prefix}executions-dlq" in attrs["Attributes"]["RedrivePolicy"]
