"""``make_engine``: the engine a tracker's options choose (memory or SQLite through a
``Store``, or a shared task space on Redis or a Redis Cluster), checked."""

from __future__ import annotations

from collections.abc import Callable

from .._retention import Retention
from ..actor.engine import Engine
from .local import LocalEngine
from .redis.engine import RedisEngine
from .store import MemoryStore, Store

__all__ = ["make_engine"]


def make_engine(
    retention: Retention,
    store: Store | None,
    cancel_grace: float,
    clock: Callable[[], float],
    redis: str | None,
    redis_cluster: str | None,
    redis_prefix: str,
) -> tuple[Engine, Store | None]:
    """The engine, and the store of a local one (None with Redis: it holds the
    records). ``ValueError``/``TypeError`` for options that do not go together."""
    if redis_cluster is not None and redis is not None:
        raise ValueError("redis and redis_cluster are exclusive: give one URL")
    if store is not None and not isinstance(store, Store):
        raise TypeError(f"store must implement taskd.Store, not {type(store).__name__}")
    shared = redis_cluster or redis
    if shared is None:
        store = store if store is not None else MemoryStore()
        local = LocalEngine(
            retention=retention, store=store, clock=clock, cancel_grace=cancel_grace
        )
        return local, store
    from .redis.space import check_prefix, check_redis_url

    if store is not None:
        raise ValueError("store and redis are exclusive: Redis holds the records")
    engine = RedisEngine(
        retention=retention,
        cancel_grace=cancel_grace,
        url=check_redis_url(shared),
        prefix=check_prefix(redis_prefix),
        cluster=redis_cluster is not None,
    )
    return engine, None
