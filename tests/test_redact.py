"""The redactor (docs/http-api.md): a corpus of credentials and of ordinary text."""

from __future__ import annotations

import pytest

import taskd
from taskd._redact import redact_error

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
