"""Stage: authenticate. Turns the request's bearer key into a :class:`Principal`.

The master key (from config) may call everything. Virtual keys are looked up by their
SHA-256 hash in the key store; answers (found or not) are kept in a small in-process cache
for ``auth.key_cache_seconds``, so the hot path costs one hash and one dict lookup, and a
flood of bad keys cannot hammer the store. That TTL is also the bound on how long a revoked
key keeps working in a process that had just seen it.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.storage.keys import KeyRecord, hash_key

_MAX_CACHED = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    team: str | None
    app: str | None
    role: str

    @property
    def is_master(self) -> bool:
        return self.key_id == "master"

    def require(self, *roles: str) -> None:
        if not (self.is_master or self.role in roles):
            raise PermissionDenied(f"this key's role ({self.role}) may not call this endpoint")


MASTER = Principal(key_id="master", team=None, app=None, role="admin")


def bearer_token(authorization: str | None, api_key_header: str | None = None) -> str | None:
    """The key from ``Authorization: Bearer K`` (or an ``x-api-key`` header)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return api_key_header.strip() if api_key_header else None


class Authenticator:
    def __init__(
        self,
        master_key: str | None,
        find: Callable[[str], Awaitable[KeyRecord | None]],
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._master_hash = hash_key(master_key).encode() if master_key else None
        self._find = find
        self._ttl = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.")
        digest = hash_key(token)
        if self._master_hash is not None and hmac.compare_digest(digest.encode(), self._master_hash):
            return MASTER
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            record = await self._find(digest)
            principal = None
            if record is not None and record.active:
                principal = Principal(record.id, record.team, record.app, record.role)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, principal)
        if principal is None:
            raise AuthenticationFailed("Invalid API key.")
        return principal
