"""Redis clients for the parts of thrifty that fail open: the cache, the budget guard and the
rate limiter.

Each of them treats any error from Redis or the socket (``UNREACHABLE``) as "down for now"
and serves without it, so a client here gives up quickly and reconnects on its own on the
next call. The pool is bounded: a burst waits for a connection instead of opening hundreds.
After a Redis restart every pooled connection is dead; one immediate retry on a fresh
connection keeps each of them from counting as an outage once. Callers pick the timeouts.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

# Whatever Redis or the socket raises (TimeoutError is an OSError) means "unreachable for now".
UNREACHABLE = (RedisError, OSError)


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    pool_timeout: float,
    max_connections: int,
    cluster: bool = False,
) -> aioredis.Redis | aioredis.RedisCluster:
    if cluster:
        return aioredis.RedisCluster.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client
