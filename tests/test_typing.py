"""Types flow to the user (docs/embedding.md): ``await handle`` is the coroutine's
type under ``mypy --strict`` in a user's own file, and JSON accepts any sequence or
mapping of JSON values. Checked by running mypy on such a file, and on the embedding
snippets the README and docs/embedding.md show."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

USER_FILE = """
from typing import assert_type

import taskd


async def work() -> dict[str, list[int]]:
    return {"ids": [1, 2]}


async def main() -> None:
    async with taskd.Tracker() as tracker:
        handle = await tracker.spawn(work(), task_type="x")
        assert_type(handle, taskd.TaskHandle[dict[str, list[int]]])
        value = await handle
        assert_type(value, dict[str, list[int]])
        rec = await tracker.create("y")
        done = await tracker.complete(rec.task_id, value)  # dict[str, list[int]] is JSON
        assert_type(done, taskd.TaskRecord)
        got = await tracker.get(rec.task_id)
        assert_type(got, taskd.TaskRecord | None)
        stats = await tracker.stats()
        assert_type(stats["records"], int)
"""

BAD_FILE = """
import taskd


async def work() -> int:
    return 1


async def main() -> None:
    async with taskd.Tracker() as tracker:
        value: str = await (await tracker.spawn(work(), task_type="x"))
"""


def _mypy(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user.py"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        # No MYPYPATH: the editable install is a static path entry mypy reads, as a
        # user's would be (docs/packaging.md).
        cwd=tmp_path,
    )


def test_await_handle_is_the_coroutines_type(tmp_path: Path) -> None:
    out = _mypy(tmp_path, USER_FILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_wrong_type_is_caught(tmp_path: Path) -> None:
    out = _mypy(tmp_path, BAD_FILE)
    assert out.returncode == 1
    assert re.search(
        r"user\.py:\d+: error: .*(Incompatible|Coroutine\[Any, Any, int\])", out.stdout
    )


ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_and_embedding_snippets_type_check(tmp_path: Path) -> None:
    blocks = [
        block
        for doc in (ROOT / "README.md", ROOT / "docs" / "embedding.md")
        for block in _python_blocks(doc)
        if "taskd.web.setup(app" in block
    ]
    assert len(blocks) >= 2  # at least one in each: a snippet that moved is still checked
    for block in blocks:
        out = _mypy(tmp_path, block)
        assert out.returncode == 0, block + out.stdout + out.stderr
