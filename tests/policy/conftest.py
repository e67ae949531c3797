"""Policy tests that keep versions run on real databases: SQLite files and a PostgreSQL server."""

from tests.services import db, db_url, postgres_server, postgres_url  # noqa: F401
