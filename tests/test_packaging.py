"""The package as users get it (docs/packaging.md): ``python -m build`` makes a wheel and
an sdist without a warning; the wheel, installed into a fresh venv (not editable, the
exact dependency versions CI pins), runs ``taskd serve --help``, reads its dashboard
page, and type-checks a user's script under ``mypy --strict``, so ``py.typed`` and the
static files are proven to ship."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_SCRIPT = """\
import asyncio

import taskd


async def main() -> str:
    async with taskd.Tracker() as tracker:
        handle = await tracker.spawn(asyncio.sleep(0, "done"), task_type="demo")
        value: str = await handle
        return value


print(asyncio.run(main()))
"""


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment for pip and mypy: nothing of the checkout's venv leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_CONSTRAINT"] = str(ROOT / "constraints.txt")
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert out.returncode == 0, f"{args}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build uses this venv's pinned setuptools, no download.
    built = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    text = built.stdout + built.stderr
    for word in ("Warning", "WARNING", "deprecat", "Deprecat"):
        assert word not in text, text
    return out


def test_the_wheel_and_the_sdist_hold_the_package_data(dist: Path) -> None:
    (wheel,) = dist.glob("aiotaskd-*.whl")
    (sdist,) = dist.glob("aiotaskd-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "taskd/py.typed",
        "taskd/static/dashboard.html",
        "taskd/engine/redis/script.lua",
        "taskd/engine/redis/tally.lua",
        "taskd/engine/redis/trees.lua",
        "taskd/engine/redis/sweep.lua",
    ):
        assert name in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    assert b"Name: aiotaskd\n" in metadata and b"License-Expression: MIT\n" in metadata
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"LICENSE", "pyproject.toml", "taskd/static/dashboard.html"} <= members


def test_the_installed_wheel_serves_and_type_checks(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("aiotaskd-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    bin_ = venv / "bin"
    _run(bin_ / "python", "-m", "pip", "install", "--quiet", wheel, "mypy", cwd=tmp_path)

    helped = _run(bin_ / "taskd", "serve", "--help", cwd=tmp_path)
    assert "--redis" in helped.stdout and "--port" in helped.stdout

    where = _run(bin_ / "python", "-c", "import taskd; print(taskd.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv))  # the wheel's copy, not the checkout's
    page = _run(
        bin_ / "python",
        "-c",
        "from importlib import resources;"
        "print(resources.files('taskd').joinpath('static/dashboard.html').read_text()[:200])",
        cwd=tmp_path,
    )
    assert "<html" in page.stdout.lower()

    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    checked = _run(
        bin_ / "python", "-m", "mypy", "--strict", "--no-incremental", script, cwd=tmp_path
    )
    assert "Success: no issues found in 1 source file" in checked.stdout
    ran = _run(bin_ / "python", script, cwd=tmp_path)
    assert ran.stdout == "done\n"

    # The same script with a wrong annotation fails: mypy really reads taskd's types.
    script.write_text(USER_SCRIPT.replace("value: str", "value: int"))
    wrong = subprocess.run(
        [bin_ / "python", "-m", "mypy", "--strict", "--no-incremental", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout
