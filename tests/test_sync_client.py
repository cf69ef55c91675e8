"""``SyncTaskdClient`` (docs/sync.md) beyond the client tests it shares with
``TaskdClient`` (the ``make_client`` fixture): the doc's snippets as written, plain
worker threads reporting to a real server, and the errors of a server that is gone."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import taskd
from taskd.client import ServerUnreachable, SyncTaskdClient

from .service import Service, free_port
from .test_interop import cli_script

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_docs_snippets(tmp_path: Path) -> None:
    first, celery, threads = _python_blocks(ROOT / "docs/sync.md")
    script = tmp_path / "snippet.py"
    script.write_text(first)
    with Service(tmp_path) as s:
        out = cli_script(script, {"TASKD_URL": s.url})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["completed", "{'docs':", "120}"]
    compile(celery, "docs/sync.md", "exec")  # (Celery is not installed here)
    compile(threads, "docs/sync.md", "exec")


def test_worker_threads_report_through_one_client(tmp_path: Path) -> None:
    """Four plain threads, one shared client: each runs a task from start to end
    while the main thread long-polls it."""
    with Service(tmp_path) as s, SyncTaskdClient(s.url) as client:
        recs = [client.create("thread-job", resource_id=f"r{i}") for i in range(4)]
        errors: list[BaseException] = []

        def work(task_id: str) -> None:
            try:
                client.start(task_id)
                for step in range(5):
                    client.progress(task_id, (step + 1) / 5, message=f"step {step + 1}")
                client.complete(task_id, {"by": threading.current_thread().name})
            except BaseException as exc:  # (reported to the main thread)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(r.task_id,)) for r in recs]
        for t in threads:
            t.start()
        done = [client.wait(r.task_id, timeout=30, poll_wait=5) for r in recs]
        for t in threads:
            t.join(10)
        assert errors == []
        assert [d.status for d in done] == [taskd.TaskStatus.COMPLETED] * 4
        assert len({str(d.result) for d in done}) == 4  # each by its own thread
        events = client.events(recs[0].task_id)
        assert next(events).status is taskd.TaskStatus.COMPLETED  # an ended task's stream
        assert list(events) == []
        with pytest.raises(taskd.InvalidTransition):
            client.start(recs[0].task_id)


def test_a_server_that_is_gone() -> None:
    with SyncTaskdClient(f"http://127.0.0.1:{free_port()}", request_timeout=2) as client:
        with pytest.raises(ServerUnreachable):
            client.get("x")
        with pytest.raises(TimeoutError):
            client.wait("x", timeout=0.5)  # retries while unreachable, then gives up
    with pytest.raises(ValueError):
        SyncTaskdClient("localhost:8080")
