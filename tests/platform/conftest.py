"""Fixtures shared by the platform tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import Session

from flowbuilder.platform.settings import override_settings


@pytest.fixture(params=["db", "aws"])
def backend(request: pytest.FixtureRequest, session: Session) -> Iterator[str]:
    """Run a test with USE_DB_SECRETS=true, then against moto's Secrets Manager."""
    if request.param == "db":
        with override_settings(USE_DB_SECRETS=True):
            yield "db"
    else:
        url = request.getfixturevalue("moto_reset")
        with override_settings(USE_DB_SECRETS=False, SECRETS_MANAGER_ENDPOINT_URL=url):
            yield url
