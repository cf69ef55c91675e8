"""The credential redactor applied to every stored error and progress message.

Each rule is anchored on word boundaries or on a provider's fixed prefix so that
ordinary text (``task-123``, ``descr_foo``, UUIDs, paths, ``tokenizer=``) survives.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ._checks import check_message
from ._models import MAX_MESSAGE_CHARS

__all__ = ["MAX_ERROR_CHARS", "redact", "redact_error", "redact_message"]

REDACTED = "[REDACTED]"
MAX_ERROR_CHARS = 500
TRUNCATED = "...[truncated]"

# Key names whose value is a secret: the key *is* or *ends with* one of these words.
_SECRET_KEY = (
    r"(?:password|passwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|account[_-]?key|shared[_-]?access[_-]?key)"
)
# A value that is only a short number ("Token: 42 tokens used") is a count, not a secret.
_NOT_A_COUNT = r"(?!\d{1,6}(?![^\s\"',;&}\]]))"


def _keep_scheme(match: re.Match[str]) -> str:
    scheme = match.group(2)
    return f"{match.group(1)}{scheme} {REDACTED}" if scheme else f"{match.group(1)}{REDACTED}"


def _keep_quotes(match: re.Match[str]) -> str:
    value = match.group(2)
    # Quoted values keep their quotes so that redacted JSON stays JSON.
    quote = '\\"' if value.startswith('\\"') else (value[0] if value[0] in "\"'" else "")
    return f"{match.group(1)}{quote}{REDACTED}{quote}"


_Replacement = str | Callable[[re.Match[str]], str]

# Each rule: its pattern, its replacement, and substrings of which the text must hold
# one for the pattern to match at all (None: always try). Checking those first skips
# most rules on ordinary text at C speed: a progress message is redacted on every
# report, and the whole table costs ~40 µs per string where the guards say nothing
# can match. Each guard is a literal the pattern itself requires, case included.
_RULES: list[tuple[re.Pattern[str], _Replacement, tuple[str, ...] | None]] = [
    # PEM and PGP private keys, also when cut off before the END line.
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
            r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)"
        ),
        REDACTED,
        ("-----BEGIN ",),
    ),
    # scheme://user:password@host — keep the user, drop the password, which may hold
    # "@" or "#" (the last "@" before the host ends it; a password has no "/").
    (
        re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):[^\s/]+@(?=[^\s@/]+(?:[/?#\s]|$))"),
        rf"\1:{REDACTED}@",
        ("://",),
    ),
    # Slack incoming-webhook URLs: the path is the credential.
    (
        re.compile(r"(https://hooks\.slack\.com/(?:services|workflows|triggers)/)[^\s\"'<>]+"),
        rf"\1{REDACTED}",
        ("https://hooks.slack.com/",),
    ),
    # Cookie headers: every value is a session.
    (re.compile(r"(?i)\b((?:set-)?cookie\s*:\s*)[^\r\n]+"), rf"\1{REDACTED}", (":",)),
    # Command-line flags: --password X, -token X (the "=" form is a key-value pair).
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])(--?[A-Za-z0-9_-]*"
            + _SECRET_KEY
            + r")\s+(?!-)"
            + _NOT_A_COUNT
            + r"\S+"
        ),
        rf"\1 {REDACTED}",
        ("-",),
    ),
    # An Authorization header: whatever follows is a credential.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"(?:(bearer|basic|token|digest)\s+)?[^\s\"',;)\]}>]+"
        ),
        _keep_scheme,
        (":", "="),
    ),
    # Bearer/Basic credentials elsewhere. A real credential has a digit, a symbol or
    # mixed case inside, which keeps "Bearer bonds" and "Basic setup" intact.
    (
        re.compile(
            r"\b(Bearer|bearer|BEARER|Basic|basic|BASIC)\s+"
            r"(?=[A-Za-z0-9._~+/=-]*(?:[0-9._~+/=-]|[a-z][A-Z]))[A-Za-z0-9._~+/-]{6,}=*"
        ),
        rf"\1 {REDACTED}",
        ("Bearer", "bearer", "BEARER", "Basic", "basic", "BASIC"),
    ),
    # key=value / key: value / "key": "value" where the key ends with a secret word.
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])(\\?[\"']?[A-Za-z0-9_.-]*"
            + _SECRET_KEY
            + r"\\?[\"']?\s*[:=]\s*)"
            + _NOT_A_COUNT
            # a JSON-escaped quoted value (\"...\"), a quoted one, or a bare one
            + r"(\\\"(?:[^\"\\]|\\[^\"])*\\\"|\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s\"',;&}\]]+)"
        ),
        _keep_quotes,
        (":", "="),
    ),
    # JSON Web Tokens: three base64url parts, the first a JSON header.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED, ("eyJ",)),
    # Provider API keys, by their documented prefixes.
    (
        re.compile(
            r"\b(?:"
            # OpenAI, Anthropic: a key has a run of 16+ characters without a hyphen,
            # so that "build-sk-ingest-pipeline-2024" (words) is no key
            r"(?<![A-Za-z0-9_.-])sk-(?=[A-Za-z0-9_-]*?[A-Za-z0-9_]{16})"
            r"(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{16,}"
            # ... but these prefixes name a key whatever follows, hyphenated or short
            # (test keys such as "sk-ant-api03-DAqSxxxxx"); no English word has them
            r"|(?<![A-Za-z0-9_.-])sk-(?:ant|proj|svcacct|admin)-[A-Za-z0-9_-]*[A-Za-z0-9]"
            r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub classic tokens
            r"|github_pat_[A-Za-z0-9_]{20,}"  # GitHub fine-grained
            r"|xox[abposre]-[A-Za-z0-9-]{10,}"  # Slack
            r"|xapp-[A-Za-z0-9-]{10,}"  # Slack app-level
            r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe secret/restricted
            r"|whsec_[A-Za-z0-9+/=]{10,}"  # Stripe/Standard Webhooks secrets
            r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}"  # AWS key ids
            r"|AIza[0-9A-Za-z_-]{30,}"  # Google
            r"|ntn_[A-Za-z0-9]{20,}"  # Notion
            r"|secret_[A-Za-z0-9]{40,}"  # Notion (legacy)
            r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
            r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
            r"|npm_[A-Za-z0-9]{36}"  # npm
            r"|ya29\.[A-Za-z0-9_-]{20,}"  # Google OAuth access tokens
            r"|SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"  # SendGrid
            r")"
        ),
        REDACTED,
        None,
    ),
    # An AWS secret access key standing alone: 40 base64 characters with upper and
    # lower case and a digit or symbol (a hex digest has one case only).
    (
        re.compile(
            r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
            r"(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
        ),
        REDACTED,
        None,
    ),
    # An AWS secret access key: 40 base64 characters right after an AWS key id.
    (
        re.compile(r"(\[REDACTED\][\s:,;/|]+)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
        rf"\1{REDACTED}",
        ("[REDACTED]",),
    ),
]


def redact(text: str) -> str:
    """Replace credentials in ``text`` with ``[REDACTED]``; leave everything else alone."""
    if not isinstance(text, str):
        raise TypeError(f"redact() takes a str, not {type(text).__name__}")
    for pattern, replacement, guard in _RULES:
        # Checked on the current text: the last rule looks for an earlier one's mark.
        if guard is None or any(g in text for g in guard):
            text = pattern.sub(replacement, text)
    return text


def redact_error(error: str | BaseException) -> str:
    """The stored form of an error: redacted, then cut to 500 chars + ``...[truncated]``."""
    if isinstance(error, BaseException):
        detail = str(error)
        text = f"{type(error).__name__}: {detail}" if detail else repr(error)
    elif isinstance(error, str):
        text = error
    else:
        raise TypeError(f"error must be a str or an exception, not {type(error).__name__}")
    # A lone surrogate cannot be stored or sent; an exception's text may hold one.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = redact(text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + TRUNCATED
    return text


def redact_message(message: object) -> str | None:
    """The stored form of a progress message: checked (``check_message``: None or a
    str of at most 1024 characters), then redacted like an error. Every way a message
    comes in (``Tracker.progress``, so ``POST …/progress`` too, and ``report_progress``)
    goes through here, in Python, before any engine sees it.

    A ``[REDACTED]`` may be longer than the secret it replaces: the result is cut
    back to the 1024 characters a message may have, with ``...[truncated]``.
    """
    text = check_message(message)
    if text is None or not text:
        return text
    text = redact(text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - len(TRUNCATED)] + TRUNCATED
    return text
