"""``IdSpace``: how a local task space mints task ids, and what an id it is asked for
tells of where that id came from.

An id is its creation instant — 13 hex digits of microseconds since the epoch,
strictly increasing within the space, so ids sort in creation order — followed by 22
URL-safe characters: 128 bits of BLAKE2b, keyed with a random key of this space's own,
over those 13 digits. Without the key nobody can guess an id (the key never leaves
the process); with it, the space tells from an id alone whether it minted it:
recompute and compare. No list of minted ids is kept, and nothing per id is random:
the instant is unique within the space, the key is drawn anew each time it opens.

That check is what NOT_FOUND's ``hint`` rests on (docs/scale-out.md): an id of this
shape whose instant is at or after the space opened (and after every id it loaded),
but which it did not mint, comes from another process running alongside this one —
several processes serve one API without a shared task space. An id from before
(an earlier boot, an expired task, a process since gone) proves nothing and gets no
hint. The first such id logs one WARNING: the operator hears of it, not only the
client. Only engines whose records are their own use this; the Redis engine mints
its ids in its script and never hints.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from binascii import b2a_base64
from typing import Final

__all__ = ["NOT_MINTED_HERE", "IdSpace"]

log = logging.getLogger("taskd")

#: NOT_FOUND's ``details.hint`` for an id another process minted while this one ran.
NOT_MINTED_HERE: Final = (
    "this task id was not minted by this process, yet dates from after its start: "
    "several processes serve this API, each with its own tasks; give them one task "
    "space with --redis URL (taskd serve, or env TASKD_REDIS) or redis=URL "
    "(taskd.web.setup under gunicorn), see docs/scale-out.md"
)

#: What every id looks like: 13 lowercase hex digits, then 22 URL-safe characters.
_SHAPE: Final = re.compile(r"[0-9a-f]{13}[A-Za-z0-9_-]{22}")
_STAMP: Final = 13
#: Standard base64 to its URL-safe alphabet (what ``base64.urlsafe_b64encode`` does).
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


class IdSpace:
    """The ids of one local task space: ``mint`` makes them, ``hint`` judges one it
    did not find. See the module docstring."""

    def __init__(self) -> None:
        self._last = 0
        self._floor = 0
        self._warned = False
        self._key = b""
        self._rekey()

    def _rekey(self) -> None:
        # BLAKE2b takes its key natively (no HMAC construction needed); the keyed state
        # is built once and copied per id, which costs less than drawing 16 random
        # bytes per id did.
        self._keyed = hashlib.blake2b(key=secrets.token_bytes(32), digest_size=16)

    def open(self, now: float) -> None:
        """The space opens at ``now``: a fresh key, and hints only for ids from now on.

        Drawn here rather than at construction so that a tracker built before a fork
        (gunicorn's ``--preload`` builds the application once) still gets one key per
        process that opens it."""
        self._rekey()
        self._floor = max(int(now * 1_000_000), self._last + 1)

    def saw(self, task_id: str) -> None:
        """An id loaded from the store: later ids sort after it, and it never gets a
        hint (it was held here, whoever minted it — a clock set back since then
        included)."""
        self._last = max(self._last, int(task_id[:_STAMP], 16))
        self._floor = max(self._floor, self._last + 1)

    def mint(self, now: float) -> tuple[str, float]:
        """A new id and its creation instant (``now``, or a microsecond past the last
        id, so that ids stay unique and sorted)."""
        stamp = int(now * 1_000_000)
        if stamp <= self._last:
            stamp = self._last + 1
        self._last = stamp
        head = f"{stamp:013x}"
        return head + self._sign(head), stamp / 1_000_000

    def _sign(self, head: str) -> str:
        keyed = self._keyed.copy()
        keyed.update(head.encode())
        # (base64.urlsafe_b64encode's two Python calls, unrolled: same text)
        return b2a_base64(keyed.digest(), newline=False).translate(_URLSAFE)[:22].decode()

    def hint(self, task_id: str) -> str | None:
        """``NOT_MINTED_HERE`` when ``task_id`` has an id's shape, dates from after this
        space opened, and was not minted by it; None otherwise. From the id alone:
        whether a record exists, and whose, plays no part (so the answer never tells
        another owner's task from a missing one)."""
        if len(task_id) != _STAMP + 22 or _SHAPE.fullmatch(task_id) is None:
            return None  # not an id of ours in shape: answered as it always was
        head = task_id[:_STAMP]
        if int(head, 16) < self._floor or secrets.compare_digest(
            self._sign(head), task_id[_STAMP:]
        ):
            return None
        if not self._warned:
            self._warned = True
            # Once per process: a misdeployed API would otherwise log on every request.
            log.warning(
                "a task id minted by another process since this one started was asked "
                "for here (not found; the answer carries a hint): several processes "
                "serve this API, each with its own tasks; run them on one task space "
                "with --redis URL (docs/scale-out.md). Logged once per process."
            )
        return NOT_MINTED_HERE
