"""The command rules every engine applies, written once.

The local engine reads them here; the Redis script gets them as generated tables
(``taskd.engine.redis.space`` renders ``LUA_RULES`` into the script), so a rule or
an error text changed here changes both.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NOT_ACKNOWLEDGED"]

#: The error of a cancelling task whose worker did not confirm within cancel_grace.
NOT_ACKNOWLEDGED: Final = "cancel not acknowledged"
