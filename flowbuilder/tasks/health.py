"""Health checks for container orchestrators: ``python -m flowbuilder.tasks.health beat``.

- ``beat``: RedBeat's lock key ``<REDBEAT_KEY_PREFIX>:lock`` (RedBeat's default name) exists
  in ``REDIS_URL``, i.e. a beat process holds the lock and refreshes it on every tick.
  (The lock outlives a killed beat by up to ``redbeat_lock_timeout``; a restarted beat
  waits for it.)

The worker's check is ``celery -A flowbuilder.tasks inspect ping -d worker@$HOSTNAME`` on
the monitoring channel (see docker-compose.yml). Exit status 0 healthy, 1 not.
"""

from __future__ import annotations

import sys


def beat_lock_key() -> str:
    from flowbuilder.platform.settings import get_settings

    return f"{get_settings().REDBEAT_KEY_PREFIX}:lock"


def check_beat() -> tuple[bool, str]:
    import redis

    from flowbuilder.platform.settings import get_settings

    key = beat_lock_key()
    client = redis.Redis.from_url(get_settings().REDIS_URL, socket_timeout=5)
    try:
        held = bool(client.exists(key))
    except redis.RedisError as exc:
        return False, f"redis unreachable: {type(exc).__name__}"
    finally:
        client.close()
    return held, f"{key} {'held' if held else 'missing'}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["beat"]:
        print("usage: python -m flowbuilder.tasks.health beat", file=sys.stderr)
        return 2
    try:
        ok, detail = check_beat()
    except Exception as exc:  # noqa: BLE001 - a health check answers, never crashes
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    print(("healthy: " if ok else "unhealthy: ") + detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
