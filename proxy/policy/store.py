"""Policy versions and their audit trail, in the ``policy_versions`` table (migration 4).

Beside the pipeline, not in it: the admin API (``proxy.api.admin``) writes a version for
every accepted change or rollback, and the reloader (``proxy.policy.reload``) writes one
when the file changed by hand ("reload-from-file"), unless the newest version already has
that text. Each row keeps the YAML, who wrote it (key id and role), when, a comment, the
unified diff against the version before, and the parent's id. Ids are 1, 2, 3, ...: the
insert assigns ``max(id) + 1`` in one statement, so concurrent writers on SQLite cannot
collide; on PostgreSQL writes take the cluster-wide advisory lock the migrations use.
Works the same on SQLite and PostgreSQL (``proxy.storage.database``).
"""

from __future__ import annotations

import contextlib
import difflib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from proxy.storage.database import Database, Row

ACTIONS = ("create", "rollback", "reload-from-file")
_COLUMNS = "id, version, yaml, author_key_id, author_role, created_at, comment, diff, parent_id, action"


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    id: int
    version: str  # the policy's label and hash (Policy.version)
    yaml: str
    author_key_id: str | None
    author_role: str | None
    created_at: float
    comment: str | None
    diff: str  # unified diff against the parent ("" for the first version)
    parent_id: int | None
    action: str

    def as_json(self, *, with_yaml: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_yaml:
            del data["yaml"]
        return data


def _version(row: Row) -> PolicyVersion:
    return PolicyVersion(
        int(row[0]),
        row[1],
        row[2],
        row[3],
        row[4],
        float(row[5]),
        row[6],
        row[7],
        None if row[8] is None else int(row[8]),
        row[9],
    )


def unified_diff(before: str, after: str, before_label: str, after_label: str) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True), before_label, after_label)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


class PolicyStore:
    def __init__(self, db: Database):
        self._db = db

    async def latest(self) -> PolicyVersion | None:
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM policy_versions ORDER BY id DESC LIMIT 1")
        return _version(rows[0]) if rows else None

    async def latest_id(self) -> tuple[int, str] | None:
        """The newest version's id and label: the cheap question replicas poll."""
        rows = await self._db.fetch("SELECT id, version FROM policy_versions ORDER BY id DESC LIMIT 1")
        return (int(rows[0][0]), rows[0][1]) if rows else None

    async def get(self, version_id: int) -> PolicyVersion | None:
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM policy_versions WHERE id = ?", version_id)
        return _version(rows[0]) if rows else None

    async def find(self, ref: str | int) -> PolicyVersion | None:
        """A version by id (``3``) or by its label (``e2e-1a2b3c4d5e6f``; the newest with it)."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return await self.get(int(ref))
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM policy_versions WHERE version = ? ORDER BY id DESC LIMIT 1", ref)
        return _version(rows[0]) if rows else None

    async def history(self, limit: int = 50, before: int | None = None) -> list[PolicyVersion]:
        """Newest first; ``before`` pages on (versions with a smaller id)."""
        where, args = ("WHERE id < ?", (before,)) if before is not None else ("", ())
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM policy_versions {where} ORDER BY id DESC LIMIT ?", *args, limit)
        return [_version(r) for r in rows]

    async def add(
        self,
        yaml: str,
        version: str,
        action: str,
        *,
        author_key_id: str | None = None,
        author_role: str | None = None,
        comment: str | None = None,
        unless_latest: bool = False,
    ) -> PolicyVersion | None:
        """Append a version; with ``unless_latest``, nothing (None) when the newest already is ``version``."""
        if action not in ACTIONS:
            raise ValueError(f"unknown policy action {action!r}")
        async with self._exclusive():
            newest = await self.latest_id()
            if unless_latest and newest is not None and newest[1] == version:
                return None
            token = secrets.token_hex(12)
            # One statement: the id is max + 1 (and the parent the max) under SQLite's write lock;
            # the guard repeats the "unless latest" check inside it, for a process that wrote since.
            guard = (
                "WHERE NOT EXISTS (SELECT 1 FROM policy_versions p"
                " WHERE p.version = ? AND p.id = (SELECT MAX(id) FROM policy_versions))"
            )
            await self._db.execute(
                "INSERT INTO policy_versions (id, token, version, yaml, author_key_id, author_role, created_at, comment, diff,"
                " parent_id, action) SELECT (SELECT COALESCE(MAX(id), 0) + 1 FROM policy_versions), ?, ?, ?, ?, ?,"
                " CAST(? AS DOUBLE PRECISION), ?, '', (SELECT MAX(id) FROM policy_versions), ? "
                + (guard if unless_latest else ""),
                *(token, version, yaml, author_key_id, author_role, time.time(), comment, action),
                *((version,) if unless_latest else ()),
            )
            rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM policy_versions WHERE token = ?", token)
            if not rows:
                return None
            added = _version(rows[0])
            parent = await self.get(added.parent_id) if added.parent_id is not None else None
            if parent is None:
                return added
            # The diff against the parent the insert really took (another writer may have come between).
            diff = unified_diff(parent.yaml, yaml, f"v{parent.id} ({parent.version})", f"v{added.id} ({version})")
            await self._db.execute("UPDATE policy_versions SET diff = ? WHERE id = ?", diff, added.id)
        return replace(added, diff=diff)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        # PostgreSQL: replicas append one at a time (the same advisory lock as migrations).
        exclusive = getattr(self._db, "exclusive", None)
        if exclusive is None:
            yield
            return
        async with exclusive():
            yield
