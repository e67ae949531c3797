"""Schema migrations for the SQLite and PostgreSQL stores, applied in order at open.

Each migration is a version number and its statements; ``schema_migrations`` records
which versions a database has. Migrations only add (tables, columns, indexes): a newer
thrifty opens an older database, and an older one refuses a newer database by name.
"""

from __future__ import annotations

import time

from proxy.errors import ConfigError
from proxy.storage.database import Database

# (version, statements); {serial} and {real} are spelled per dialect.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                prefix TEXT NOT NULL,
                team TEXT NOT NULL,
                app TEXT,
                role TEXT NOT NULL,
                created_at {real} NOT NULL,
                revoked_at {real}
            )""",
            "CREATE INDEX IF NOT EXISTS api_keys_team ON api_keys (team)",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE IF NOT EXISTS ledger (
                id TEXT PRIMARY KEY,
                request_id TEXT NOT NULL,
                ts {real} NOT NULL,
                endpoint TEXT NOT NULL,
                key_id TEXT,
                team TEXT,
                app TEXT,
                user_id TEXT,
                tags TEXT,
                requested_model TEXT NOT NULL,
                served_model TEXT,
                provider TEXT,
                route TEXT,
                policy_version TEXT,
                cache TEXT NOT NULL,
                stream BOOLEAN NOT NULL,
                prompt_tokens_before BIGINT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                cached_tokens BIGINT NOT NULL,
                reasoning_tokens BIGINT NOT NULL,
                usage_source TEXT NOT NULL,
                price_input TEXT,
                price_output TEXT,
                price_cached_input TEXT,
                price_source TEXT,
                cost_nusd BIGINT NOT NULL,
                baseline_nusd BIGINT NOT NULL,
                savings_cache_nusd BIGINT NOT NULL,
                savings_routing_nusd BIGINT NOT NULL,
                savings_pruning_nusd BIGINT NOT NULL,
                overhead_nusd BIGINT NOT NULL,
                latency_ms {real} NOT NULL,
                upstream_ms {real},
                ttft_ms {real},
                status INTEGER NOT NULL,
                error_code TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)",
            "CREATE INDEX IF NOT EXISTS ledger_team_ts ON ledger (team, ts)",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE ledger ADD COLUMN has_tools BOOLEAN",
            "ALTER TABLE ledger ADD COLUMN has_images BOOLEAN",
            "ALTER TABLE ledger ADD COLUMN json_mode TEXT",
            "ALTER TABLE ledger ADD COLUMN task_class TEXT",
            "ALTER TABLE ledger ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ledger ADD COLUMN cascade TEXT",
            "ALTER TABLE ledger ADD COLUMN similarity {real}",
            "ALTER TABLE ledger ADD COLUMN prune TEXT",
        ),
    ),
    (
        4,
        (
            # Policy versions and their audit trail (proxy.policy.store); id is assigned by the
            # insert itself (max + 1), token finds the row just written.
            """CREATE TABLE IF NOT EXISTS policy_versions (
                id BIGINT PRIMARY KEY,
                token TEXT NOT NULL UNIQUE,
                version TEXT NOT NULL,
                yaml TEXT NOT NULL,
                author_key_id TEXT,
                author_role TEXT,
                created_at {real} NOT NULL,
                comment TEXT,
                diff TEXT NOT NULL,
                parent_id BIGINT,
                action TEXT NOT NULL
            )""",
        ),
    ),
    (
        5,
        (
            # The learned difficulty score routing saw, and what users said of the answers
            # (``POST /v1/thrifty/feedback``), both read by ``thrifty policy calibrate``.
            "ALTER TABLE ledger ADD COLUMN difficulty {real}",
            "CREATE INDEX IF NOT EXISTS ledger_request_id ON ledger (request_id)",
            # key_id is the key that made the request (request ids are the client's to choose, so
            # two keys may share one); one row per request and key: the latest feedback wins.
            """CREATE TABLE IF NOT EXISTS feedback (
                request_id TEXT NOT NULL,
                key_id TEXT NOT NULL,
                score {real} NOT NULL,
                comment TEXT,
                ts {real} NOT NULL,
                PRIMARY KEY (request_id, key_id)
            )""",
        ),
    ),
)

_DIALECT = {
    "sqlite": {"real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"},
}


async def apply(db: Database) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at {real} NOT NULL)".format(
            **_DIALECT[db.dialect]
        )
    )
    rows = await db.fetch("SELECT version FROM schema_migrations")
    have = {r[0] for r in rows}
    latest = MIGRATIONS[-1][0]
    if have and max(have) > latest:
        raise ConfigError(
            f"ledger.url: the database has schema version {max(have)}, newer than this thrifty ({latest}); upgrade thrifty"
        )
    for version, statements in MIGRATIONS:
        if version in have:
            continue
        for statement in statements:
            await db.execute(statement.format(**_DIALECT[db.dialect]))
        await db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            version,
            time.time(),
        )
