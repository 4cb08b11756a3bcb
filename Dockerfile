# Flow Builder execution core: one image for the worker, beat, flower and migrations.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No compiler or system libraries: every dependency installs from a manylinux wheel,
# including pycurl (kombu's SQS extra; its wheel bundles libcurl), psycopg[binary],
# cryptography and selectolax.
WORKDIR /app

# Only what the package needs (never a developer's .env or local database).
COPY pyproject.toml alembic.ini ./
COPY flowbuilder ./flowbuilder
COPY migrations ./migrations

# Editable install: `flowbuilder db upgrade` finds migrations/ beside the package
# (flowbuilder/platform/migrate.py), which a regular wheel install would not carry.
# Flower's dependencies are the `flower` extra, not part of a plain install (the API does
# not need them); this one image also runs the flower service, so it installs the extra.
# Build an image without it with `--build-arg EXTRAS=`.
ARG EXTRAS=flower
RUN pip install -e ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --create-home --uid 10001 --user-group flowbuilder \
    && mkdir -p /app/.flowbuilder \
    && chown flowbuilder:flowbuilder /app/.flowbuilder

USER flowbuilder

CMD ["celery", "-A", "flowbuilder.tasks", "worker", "--loglevel=INFO"]
