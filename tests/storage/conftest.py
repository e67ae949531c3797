"""The storage tests run against real databases: SQLite files and a PostgreSQL server."""

from tests.services import db, db_url, postgres_server, postgres_url, redis_url  # noqa: F401
