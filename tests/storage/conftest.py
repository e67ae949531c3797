"""The storage tests run against real databases: SQLite files and a PostgreSQL server."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.storage.database import Database, open_database
from tests.services import postgres_server, postgres_url, redis_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs once on an SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thrifty.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url)
    yield database
    await database.close()
