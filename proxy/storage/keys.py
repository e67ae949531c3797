"""Virtual API keys: created once, shown once, stored only as a SHA-256 hash.

A key is ``sk-thr-`` and 32 random bytes (URL-safe base64). Because keys are random and
long, a plain SHA-256 is the right hash (as GitHub and Stripe do for tokens): a slow
password hash would add milliseconds to every request for no gain. The table keeps the
hash, a short display prefix, the team, the app and the role (``user``, ``finance`` or
``admin``); revocation stamps ``revoked_at`` and is never undone.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from proxy.storage.database import Database

KEY_PREFIX = "sk-thr-"
ROLES = ("user", "finance", "admin")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    prefix: str
    team: str
    app: str | None
    role: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


_COLUMNS = "id, prefix, team, app, role, created_at, revoked_at"


class KeyStore:
    def __init__(self, db: Database):
        self._db = db

    async def create(self, team: str, app: str | None = None, role: str = "user") -> tuple[str, KeyRecord]:
        """Store a new key and return it in plain text: the only time it exists unhashed."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        key = generate_key()
        record = KeyRecord(
            id="key_" + secrets.token_hex(6),
            prefix=key[: len(KEY_PREFIX) + 4],
            team=team,
            app=app,
            role=role,
            created_at=time.time(),
        )
        await self._db.execute(
            "INSERT INTO api_keys (id, key_hash, prefix, team, app, role, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            record.id,
            hash_key(key),
            record.prefix,
            record.team,
            record.app,
            record.role,
            record.created_at,
        )
        return key, record

    async def find(self, key_hash: str) -> KeyRecord | None:
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", key_hash)
        return KeyRecord(*rows[0]) if rows else None

    async def list(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id")
        return [KeyRecord(*r) for r in rows]

    async def revoke(self, key_id: str) -> bool:
        """Revoke by id; False when no active key has that id."""
        rows = await self._db.fetch("SELECT id FROM api_keys WHERE id = ? AND revoked_at IS NULL", key_id)
        if not rows:
            return False
        await self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", time.time(), key_id)
        return True
