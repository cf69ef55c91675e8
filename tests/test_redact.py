"""The redactor (docs/http-api.md): a corpus of credentials and of ordinary text, and
where it applies: stored errors and progress messages, on every engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypedDict

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import taskd
import taskd.web
from taskd._models import MAX_MESSAGE_CHARS
from taskd._redact import redact_error, redact_message

from .redis_server import RedisServer

# (text, the secret part that must disappear)
SECRETS = [
    # found leaking by a hostile probe (docs/reliability.md)
    ("aws secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here", "wJalrXUtnFEMI/K7MDENG"),
    (
        "post to https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "T00000000/B00000000",
    ),
    (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0\n-----END PGP PRIVATE KEY BLOCK-----",
        "lQOYBF0",
    ),
    ("postgres://admin:p@ss#w0rd@db.example.com:5432/x", "ss#w0rd"),
    ("Cookie: session=abc123; csrftoken=zzz", "abc123"),
    ("token ya29.a0AfH6SMBx1234567890abcdefghijk", "ya29.a0AfH6SMBx"),
    ("DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abcdEFGH1234+/==;", "abcdEFGH1234"),
    ("key SG.abcdefghijklmnopqrstuv.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg", "SG.abcdef"),
    ("run --password hunter2 --verbose", "hunter2"),
    ('{\\"password\\": \\"hunter2\\"}', "hunter2"),
    ("OpenAI key sk-proj-abcdefghijklmnopqrstuvwxyz123456", "sk-proj-abcdefghijklmnopqrst"),
    ("key=sk-abcdefghijklmnopqrstuvwxyzABCD", "sk-abcdefghijklmnopqrstuvwxyzABCD"),
    ("anthropic sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz-0123", "sk-ant-api03-AbCdEf"),
    ("token ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij", "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    ("oauth gho_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij used", "gho_ABCDEFGHIJKLMNOP"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_11ABCDEFG"),
    ("slack xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "xoxb-1234567890"),
    ("slack user xoxp-1234567890-abcdefghij", "xoxp-1234567890-abcdefghij"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("stripe test rk_test_4eC39HqLyjWDarjtT1zdp7dc", "rk_test_4eC39HqLyjWDarjtT1zdp7dc"),
    ("aws AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
    ("temp ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    (
        "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG",
    ),
    ("google AIzaSyA-1234567890abcdefghijklmnopqrstu", "AIzaSyA-1234567890abcdefghij"),
    ("notion ntn_1234567890abcdefghijklmnopqrstuvwxyzAB", "ntn_1234567890abcdefghij"),
    ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
    ("header Authorization: Bearer mytoken", "mytoken"),
    ("sent Bearer 9f8e7d6c5b4a39281706", "9f8e7d6c5b4a39281706"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='", "dXNlcjpwYXNzd29yZA"),
    ("proxy Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    (
        "jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
        ".eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpM",
        "SflKxwRJSMeKKF2QT4fwpM",
    ),
    ("connect postgres://app:hunter2@db.internal:5432/main failed", "hunter2"),
    ("redis://default:s3cr3t-pw@cache:6379/0 refused", "s3cr3t-pw"),
    ("https://user:pa55word@example.com/path", "pa55word"),
    ("password=hunter2", "hunter2"),
    ("db_password = 'correct horse'", "correct horse"),
    ('{"password": "hunter2", "user": "bob"}', "hunter2"),
    ("client_secret: abcdef123456", "abcdef123456"),
    ("passwd=letmein!", "letmein!"),
    ("api_key=AbC123xyz", "AbC123xyz"),
    ("apikey: 0123456789abcdef", "0123456789abcdef"),
    ("X_ACCESS_KEY=myaccesskey", "myaccesskey"),
    ("auth_token=tok_12345", "tok_12345"),
    ('"refresh_token": "r1.abc"', "r1.abc"),
    ("?token=abc123&page=2", "abc123"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----",
        "MIIEowIBAAKCAQEA7",
    ),
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B (cut off", "MIIEvQIBADANBgkqhkiG9w0B"),
    ("hf token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "hf_abcdefghijklmnopqrstuvwxyz"),
    # unambiguous prefixes, hyphenated or short (OpenViking's own test key)
    ("OPENAI_API_KEY unset, using sk-ant-api03-DAqSxxxxx", "DAqSxxxxx"),
    ("key sk-proj-abc123 rejected", "abc123"),
    ("sk-ant-admin01-Xy-z9 expired", "admin01-Xy-z9"),
    ("(sk-svcacct-short)", "short"),
]

BENIGN = [
    "task-123",
    "descr_foo",
    "550e8400-e29b-41d4-a716-446655440000",
    "/var/lib/taskd/tasks.db",
    "/home/alice/.ssh/known_hosts",
    "C:\\Users\\bob\\report.pdf",
    "https://example.com/api/v1/tasks?status=failed&limit=50",
    "http://127.0.0.1:8080/health",
    "postgres://db.internal:5432/main",
    "user@example.com wrote in",
    "The quick brown fox jumps over the lazy dog.",
    "tokenizer=bpe",
    "tokenizers: 3",
    "max_tokens=4096",
    "tokens_used: 1200",
    "the secretary called",
    "passwordless login enabled",
    "task_type=session_commit",
    "risk-assessment-report-2024",
    "desk-lamp-model-x",
    "session s1 already has a commit in progress",
    "ValueError: invalid literal for int() with base 10: 'abc'",
    "TimeoutError: upstream timeout after 30s",
    "extracting memories from 120 documents",
    "Bearer bonds are old-fashioned",
    "Basic setup complete",
    "sk-learn is not a package name",
    "ghp_short",
    "AKIA is a prefix",
    "eyJ alone is not a token",
    "file:///tmp/report.txt",
    "v1.2.3-rc.1+build.5",
    "key: value pairs are fine",
    "monkey=banana",
    "index 66147ba0e65ccRNQTKzCTAlL4CIeoiG30gA",
    "2026-11-27T20:15:52.341964Z",
    "error code E501 at line 42",
    "build-sk-ingest-pipeline-2024",
    "Token: 42 tokens used",
    "max_tokens=4096",
    "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "port: 8080",
    "https://example.com/a@b",
    # "sk-" inside ordinary words, next to the unambiguous prefixes
    "risk-averse",
    "desk-top",
    "task-ant",
    "a risk-ant-colony model",
    "kiosk-proj-2024",
    "Anthropic keys start with sk-ant-...",
]


def test_corpus_sizes() -> None:
    assert len(SECRETS) >= 30 and len(BENIGN) >= 30


@pytest.mark.parametrize(("text", "secret"), SECRETS, ids=range(len(SECRETS)))
def test_credentials_are_redacted(text: str, secret: str) -> None:
    out = taskd.redact(text)
    assert secret not in out
    assert "[REDACTED]" in out


@pytest.mark.parametrize("text", BENIGN)
def test_ordinary_text_survives(text: str) -> None:
    assert taskd.redact(text) == text


def test_context_around_a_secret_survives() -> None:
    assert (
        taskd.redact("connect postgres://app:hunter2@db:5432/x failed: timeout")
        == "connect postgres://app:[REDACTED]@db:5432/x failed: timeout"
    )
    assert taskd.redact('{"password": "x", "n": 1}') == '{"password": "[REDACTED]", "n": 1}'


def test_errors_are_truncated_after_redaction() -> None:
    text = redact_error("x" * 600)
    assert text == "x" * 500 + "...[truncated]"
    assert redact_error("short") == "short"
    assert redact_error(ValueError("password=abc")) == "ValueError: password=[REDACTED]"


def test_redact_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        taskd.redact(b"bytes")  # type: ignore[arg-type]


# --- progress messages ----------------------------------------------------------------

LEAKY = "uploading with sk-ant-api03-DAqSxxxxx and password=hunter2"
CLEAN = "uploading with [REDACTED] and password=[REDACTED]"


def test_progress_messages_are_redacted_and_stay_within_the_limit() -> None:
    assert redact_message(None) is None
    assert redact_message("") == ""
    assert redact_message("halfway") == "halfway"
    assert redact_message(LEAKY) == "uploading with [REDACTED] and password=[REDACTED]"
    # [REDACTED] is longer than "x": the stored message is cut back to the limit.
    long = redact_message("token=x " * (MAX_MESSAGE_CHARS // 8))
    assert long is not None and len(long) == MAX_MESSAGE_CHARS
    assert long.endswith("...[truncated]") and "token=x" not in long
    with pytest.raises(ValueError):
        redact_message("x" * (MAX_MESSAGE_CHARS + 1))
    with pytest.raises(TypeError):
        redact_message(42)


class Options(TypedDict, total=False):
    """What picks an engine (``Tracker`` and ``create_app`` take these)."""

    store: taskd.Store
    redis: str
    redis_prefix: str


Engines = Callable[[], Options]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def every_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engines:
    """Options for ``Tracker``/``create_app`` on each engine; a fresh store per call."""

    def options() -> Options:
        if request.param == "sqlite":
            return {"store": taskd.SQLiteStore(str(tmp_path / f"{uuid.uuid4().hex}.db"))}
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            return {"redis": server.url, "redis_prefix": f"test-{uuid.uuid4().hex[:12]}:"}
        return {}

    if request.param == "redis":
        request.getfixturevalue("redis_server")  # started outside the test's event loop
    return options


async def test_progress_messages_are_redacted_on_every_engine(every_engine: Engines) -> None:
    """Tracker.progress and report_progress: the record never holds the secret."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def job() -> None:
        taskd.report_progress(0.5, LEAKY)
        started.set()
        await release.wait()

    async with taskd.Tracker(close_timeout=0.5, **every_engine()) as tracker:
        external = await tracker.create("upload")
        await tracker.start(external.task_id)
        rec = await tracker.progress(external.task_id, 0.5, message=LEAKY)
        assert rec.message == "uploading with [REDACTED] and password=[REDACTED]"
        stored = await tracker.get(external.task_id)
        assert stored is not None and stored.message == rec.message
        await tracker.fail(external.task_id, "done")  # nothing left running at close

        handle = await tracker.spawn(job(), task_type="upload")
        await started.wait()
        # report_progress was queued before this read: the mailbox keeps the order.
        spawned = await tracker.get(handle.task_id)
        assert spawned is not None and spawned.message == CLEAN
        release.set()
        await handle


async def test_progress_messages_are_redacted_over_http_on_every_engine(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    every_engine: Engines,
) -> None:
    """POST …/progress with a secret in ``message``: neither the answer nor a later GET
    shows it (docs/http-api.md)."""
    client = await aiohttp_client(taskd.web.create_app(close_timeout=0.2, **every_engine()))
    resp = await client.post("/api/v1/tasks", json={"task_type": "upload"})
    assert resp.status == 201, await resp.text()
    task_id = (await resp.json())["result"]["task_id"]
    assert (await client.post(f"/api/v1/tasks/{task_id}/start")).status == 200
    resp = await client.post(f"/api/v1/tasks/{task_id}/progress", json={"message": LEAKY})
    assert resp.status == 200, await resp.text()
    answered = (await resp.json())["result"]["message"]
    resp = await client.get(f"/api/v1/tasks/{task_id}")
    stored = (await resp.json())["result"]["message"]
    assert answered == stored == "uploading with [REDACTED] and password=[REDACTED]"
    assert (await client.post(f"/api/v1/tasks/{task_id}/fail", json={"error": "x"})).status == 200
