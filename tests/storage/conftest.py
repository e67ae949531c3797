"""The storage tests run against real databases: SQLite files and a PostgreSQL server."""

from tests.services import postgres_server, postgres_url, redis_url  # noqa: F401
