"""Hot reload of the routing policy: the file watched, SIGHUP, admin writes, and other replicas.

Beside the route stage: the :class:`Router` reads ``router.policy`` once per request, so
swapping that one reference is atomic and a request in flight finishes on the version it
started with. A background task polls the file's (mtime, inode, size) about every second;
on a change (or SIGHUP, or ``request_reload``) the file is read and validated on a worker
thread and swapped in only when valid. An invalid file is logged with ``file:line``, kept
in ``file_error`` for the admin API, and the old policy stays: never half-applied.

The admin API publishes through :meth:`PolicyReloader.publish`: the version is stored,
the file replaced atomically (temporary file, then ``os.replace``) so every worker and
every replica watching the same file reloads, and this worker swaps at once. Replicas that
do not share the file converge through the database: every ``db_interval`` seconds the
newest version id is read, and a newer version (validated here first) is written to the
local file and swapped in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from proxy.errors import ConfigError
from proxy.pipeline.auth import Principal
from proxy.pipeline.route import Router
from proxy.policy.loader import parse_policy
from proxy.policy.model import Policy
from proxy.policy.store import PolicyStore, PolicyVersion
from proxy.settings import ModelConfig

log = logging.getLogger("thrifty.policy")

Signature = tuple[int, int, int] | None  # (mtime_ns, inode, size); None: the file is missing


def signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def read_policy(path: str, models: Sequence[ModelConfig]) -> tuple[str, Policy]:
    """The file's text and its validated policy; raises ConfigError naming file:line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file: {exc.strerror}", source=path) from None
    return text, parse_policy(text, path, models)


def write_atomically(path: str, text: str) -> None:
    """Readers (other workers, other replicas on a shared volume) see the old file or the new one, never half."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError:
        if tmp.is_file():
            tmp.unlink()
        raise


class PolicyReloader:
    def __init__(
        self,
        path: str,
        models: Sequence[ModelConfig],
        router: Router,
        store: PolicyStore | None,
        *,
        interval: float = 1.0,
        db_interval: float = 5.0,
    ):
        self.path = path
        self.models = tuple(models)
        self.router = router
        self.store = store
        self.interval = interval
        self.db_interval = db_interval
        self.file_error: str | None = None  # the last invalid file's problem, until a valid one comes
        self.version_id: int | None = None  # the stored version the router runs, when known
        self.text: str | None = None  # the YAML the router runs
        self._signature: Signature = None
        self._seen_id = 0
        self._lock = asyncio.Lock()  # one change at a time in this worker
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Record the file as a version (unless it is the newest already), then watch."""
        await self.check("start-up", force=True)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="thrifty-policy-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def request_reload(self) -> None:
        """SIGHUP: read the file again now, changed or not (safe to call from a signal handler)."""
        self._wake.set()

    def validate(self, text: str) -> Policy:
        """The policy in ``text``, checked as the file would be (messages name this file and a line)."""
        return parse_policy(text, self.path, self.models)

    async def publish(
        self, text: str, policy: Policy, action: str, author: Principal | None, comment: str | None
    ) -> PolicyVersion:
        """Store a new version, replace the file, swap it in here; the watchers elsewhere follow."""
        async with self._lock:
            if self.store is None:
                raise ConfigError("no policy store: versions cannot be recorded")
            stored = await self.store.add(
                text,
                policy.version,
                action,
                author_key_id=author.key_id if author else None,
                author_role=author.role if author else None,
                comment=comment,
            )
            assert stored is not None  # only "unless_latest" adds nothing
            await self._write(text, stored.id)
            self._swap(policy, f"{action} by {author.key_id if author else 'unknown'}", stored.id, text)
            self._seen_id = max(self._seen_id, stored.id)
            self.file_error = None
            return stored

    async def _watch(self) -> None:
        next_poll = time.monotonic() + self.db_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            forced = self._wake.is_set()
            self._wake.clear()
            # A database or disk hiccup must not end the watching: log it and try again next tick.
            try:
                await self.check("SIGHUP" if forced else "file changed", force=forced)
                if self.store is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.db_interval
                    await self.follow_store()
            except Exception:
                log.exception("policy reload failed; the current policy stays")

    async def check(self, reason: str, *, force: bool = False) -> Policy | None:
        """Reload the file if it changed (or when forced); the new policy, or None when nothing was swapped."""
        async with self._lock:
            current = await asyncio.to_thread(signature, self.path)
            if current == self._signature and not force:
                return None
            self._signature = current
            try:
                text, policy = await asyncio.to_thread(read_policy, self.path, self.models)
            except ConfigError as exc:
                self.file_error = str(exc)
                log.error("policy not reloaded (%s), version %s stays: %s", reason, self.router.policy.version, exc)
                return None
            self.file_error = None
            version_id = None
            if self.store is not None:
                stored = await self.store.add(text, policy.version, "reload-from-file", comment=reason, unless_latest=True)
                latest = stored or await self.store.latest()
                if latest is not None:
                    self._seen_id = max(self._seen_id, latest.id)
                    version_id = latest.id if latest.version == policy.version else None
            if policy.version == self.router.policy.version:
                self.version_id, self.text = version_id, text
                return None
            self._swap(policy, reason, version_id, text)
            return policy

    async def follow_store(self) -> Policy | None:
        """Take a newer version another replica stored: validate, write the local file, swap."""
        assert self.store is not None
        async with self._lock:
            newest = await self.store.latest_id()
            if newest is None or newest[0] <= self._seen_id:
                return None
            self._seen_id = newest[0]
            if newest[1] == self.router.policy.version:
                self.version_id = newest[0]
                return None
            stored = await self.store.get(newest[0])
            if stored is None:
                return None
            try:
                policy = await asyncio.to_thread(self.validate, stored.yaml)
            except ConfigError as exc:
                log.error(
                    "stored policy version %s is invalid here, version %s stays: %s", stored.id, self.router.policy.version, exc
                )
                return None
            await self._write(stored.yaml, stored.id)
            self._swap(policy, f"version {stored.id} from the database", stored.id, stored.yaml)
            return policy

    async def _write(self, text: str, version_id: int) -> None:
        """Replace the file (so other workers, and this one after a restart, run the version too).
        A file that cannot be written (a read-only mount) does not stop the swap: the version
        runs from the database here, and at the next start the file wins again."""
        try:
            await asyncio.to_thread(write_atomically, self.path, text)
        except OSError as exc:
            log.warning(
                "policy file %s not written (%s): version %s runs from the database until a restart", self.path, exc, version_id
            )
        self._signature = await asyncio.to_thread(signature, self.path)

    def _swap(self, policy: Policy, reason: str, version_id: int | None, text: str) -> None:
        old = self.router.policy.version
        self.router.swap(policy)
        self.version_id, self.text = version_id, text
        log.info("routing policy reloaded (%s): version %s -> %s, %d rules", reason, old, policy.version, len(policy.rules))
