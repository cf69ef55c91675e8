"""Types flow to the user (docs/embedding.md): ``await handle`` is the coroutine's
type under ``mypy --strict`` in a user's own file, and JSON accepts any sequence or
mapping of JSON values. Checked by running mypy on such a file, and on the embedding
snippets the README and docs/embedding.md show."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


SNIPPETS = [
    block
    for doc in (ROOT / "README.md", ROOT / "docs" / "embedding.md")
    for block in _python_blocks(doc)
    if "taskd.web.setup(app" in block
]


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One mypy run over every file (a run costs seconds; the files are independent
    modules): each file's lines of the report, by file name."""
    where = tmp_path_factory.mktemp("mypy")
    files = {"user.py": USER_FILE, "bad.py": BAD_FILE}
    files.update({f"snippet_{n}.py": block for n, block in enumerate(SNIPPETS)})
    for name, text in files.items():
        (where / name).write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        capture_output=True,
        text=True,
        timeout=300,
        # No MYPYPATH: the editable install is a static path entry mypy reads, as a
        # user's would be (docs/packaging.md).
        cwd=where,
    )
    assert not out.stderr, out.stderr
    lines = out.stdout.splitlines()
    return {name: "\n".join(ln for ln in lines if ln.startswith(name + ":")) for name in files}


def test_await_handle_is_the_coroutines_type(mypy_report: dict[str, str]) -> None:
    assert mypy_report["user.py"] == ""


def test_a_wrong_type_is_caught(mypy_report: dict[str, str]) -> None:
    assert re.search(
        r"bad\.py:\d+: error: .*(Incompatible|Coroutine\[Any, Any, int\])", mypy_report["bad.py"]
    )


def test_the_readme_and_embedding_snippets_type_check(mypy_report: dict[str, str]) -> None:
    assert len(SNIPPETS) >= 2  # at least one in each: a snippet that moved is still checked
    for n, block in enumerate(SNIPPETS):
        assert mypy_report[f"snippet_{n}.py"] == "", block
