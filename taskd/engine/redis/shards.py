"""``Shards``: where each owner's keys live, one hash tag per owner on a Redis Cluster.

On one Redis every key of a deployment shares one hash tag, ``{prefix}`` (the *home*
base). On a Redis Cluster (``redis_cluster=URL``) each owner's keys get a tag of their
own, ``{prefix:owner}``, so each owner's records, indexes, dedup keys, quota, cap,
counters, change stream and notes sit in one slot and every per-owner command stays
one atomic call, while different owners spread over the masters. Tasks without an
owner, and what belongs to the deployment as a whole (liveness, the page-token key,
the registry below), stay under the home base.

An owner is used in the tag as it is when it is short and plain (letters, digits,
``._@+=-``, at most 64 characters); any other owner becomes ``~`` and a hash of it,
so no owner text can reach outside its tag.

A task id names its shard: the first ``CODE_LEN`` characters of its random part are a
hash of the shard's base (its *code*), so a read by id without an owner (an admin's
``GET``, a runner's report) finds the slot from the id alone. The registry
(``keys.SHARDS``, a hash under the home base: code → base) lists every shard that
ever held a task; an admin listing, the deployment's metrics and the sweeps read it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Final

__all__ = ["CODE_LEN", "Shards"]

#: Characters of an id's random part that name its shard.
CODE_LEN: Final = 6
_PLAIN: Final = re.compile(r"[A-Za-z0-9._@+=-]{1,64}")


def _code(base: str) -> str:
    digest = hashlib.blake2b(base.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()[:CODE_LEN]


class Shards:
    """The bases of one deployment: one (``home``) on a single Redis, one per owner
    on a cluster. See the module docstring."""

    __slots__ = ("_by_code", "_codes", "cluster", "home", "prefix", "registered")

    def __init__(self, prefix: str, *, cluster: bool) -> None:
        self.prefix = prefix
        self.cluster = cluster
        #: The deployment's own base: tasks without an owner, and shared keys.
        self.home = "{" + prefix + "}"
        self._by_code: dict[str, str] = {_code(self.home): self.home}
        self._codes: dict[str, str] = {self.home: _code(self.home)}
        #: Bases this process knows to be in the registry.
        self.registered: set[str] = {self.home}

    def of_owner(self, owner: str | None) -> str:
        """The base of an owner's keys (the home base for no owner, or on one Redis)."""
        if owner is None or not self.cluster:
            return self.home
        if _PLAIN.fullmatch(owner) is None:
            owner = "~" + hashlib.blake2b(owner.encode(), digest_size=12).hexdigest()
        sep = "" if self.prefix.endswith(":") else ":"
        return "{" + self.prefix + sep + owner + "}"

    def code(self, base: str) -> str:
        """The code a base's ids carry."""
        code = self._codes.get(base)
        if code is None:
            code = self._codes[base] = _code(base)
            self._by_code.setdefault(code, base)
        return code

    def random_part(self, base: str) -> str:
        """The random part of a new id in ``base``: on a cluster, its code first."""
        if not self.cluster:
            return secrets.token_urlsafe(16)
        return self.code(base) + secrets.token_urlsafe(12)

    def of_id(self, task_id: str) -> str | None:
        """The base an id was minted in, if known here (None: read the registry, or
        the id is no id of this deployment)."""
        if not self.cluster:
            return self.home
        return self._by_code.get(task_id[13 : 13 + CODE_LEN])

    def learn(self, registry: dict[str, str]) -> None:
        """The registry as read (code → base)."""
        for code, base in registry.items():
            if base.startswith("{") and base.endswith("}"):
                self._by_code.setdefault(code, base)
                self._codes.setdefault(base, code)
                self.registered.add(base)

    def all(self) -> list[str]:
        """Every base known here, the home base first."""
        return [self.home, *sorted(self.registered - {self.home})]
