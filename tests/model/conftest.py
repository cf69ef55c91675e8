"""Every test here is a stress suite: CI runs them all; the fast loop skips them with
``python -m pytest -m "not stress"`` (docs/reliability.md)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.stress)
