"""Records as Redis holds them, decoded: ``decode_record`` for one text, ``Decoder``
for the cache that hands back the same object for the same version."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Final

from ..._models import RawJSON, TaskRecord
from ..codec import from_hash

__all__ = ["Decoder", "decode_record"]


def decode_record(text: str, extra: Mapping[str, str] | None = None) -> tuple[TaskRecord, int]:
    """A record as the script sends it (a JSON object of its hash's text fields), and
    the sequence number of its latest change. ``extra`` are fields read beside it: a
    change stream entry carries none of ``PAYLOAD``, which only the record holds."""
    fields: dict[str, str] = json.loads(text)
    if extra:
        fields.update(extra)
    return from_hash(fields)


class Decoder:
    """Decodes records, and hands back the same object for the same record version:
    a page of 20 records, re-read every poll, is then decoded and rendered to JSON once
    (the web layer's render cache is keyed by the record object).

    Bounded by bytes, not by count: a cache of 8,192 versions held 8 GiB once results
    were 1 MiB each. The oldest entries go first; a record over 1/8 of the budget is
    decoded but never kept (it would flush the cache for one entry)."""

    __slots__ = ("_cache", "bytes")

    #: The most the cache holds: its keys (record texts) and the large results kept
    #: as text beside them, counted with ``sys.getsizeof``.
    BUDGET: Final = 32 * 1024 * 1024
    #: Entries at most (many tiny records cost more in dict slots than in text).
    SIZE: Final = 8192

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[TaskRecord, int], int]] = {}
        #: What the entries held now cost (the budget's accounting).
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, text: str) -> tuple[TaskRecord, int]:
        """The record of ``text`` and its sequence number (cached, see above)."""
        hit = self._cache.get(text)
        if hit is not None:
            return hit[0]
        decoded = decode_record(text)
        result = decoded[0].result_data
        cost = sys.getsizeof(text) + (sys.getsizeof(result) if isinstance(result, RawJSON) else 0)
        if cost > self.BUDGET // 8:
            return decoded
        cache = self._cache
        while cache and (self.bytes + cost > self.BUDGET or len(cache) >= self.SIZE):
            # dicts keep insertion order: the first entry is the oldest
            oldest = next(iter(cache))
            self.bytes -= cache.pop(oldest)[1]
        cache[text] = (decoded, cost)
        self.bytes += cost
        return decoded
