"""``python -m taskd``: the same as the ``taskd`` command."""

from __future__ import annotations

from .cli import _entry

_entry()
