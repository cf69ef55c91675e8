"""The credential redactor applied to every stored error string.

Each rule is anchored on word boundaries or on a provider's fixed prefix so that
ordinary text (``task-123``, ``descr_foo``, UUIDs, paths, ``tokenizer=``) survives.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["MAX_ERROR_CHARS", "redact", "redact_error"]

REDACTED = "[REDACTED]"
MAX_ERROR_CHARS = 500
TRUNCATED = "...[truncated]"

# Key names whose value is a secret: the key *is* or *ends with* one of these words.
_SECRET_KEY = r"(?:password|passwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key)"


def _keep_scheme(match: re.Match[str]) -> str:
    scheme = match.group(2)
    return f"{match.group(1)}{scheme} {REDACTED}" if scheme else f"{match.group(1)}{REDACTED}"


def _keep_quotes(match: re.Match[str]) -> str:
    value = match.group(2)
    # Quoted values keep their quotes so that redacted JSON stays JSON.
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match.group(1)}{quote}{REDACTED}{quote}"


_Replacement = str | Callable[[re.Match[str]], str]

_RULES: list[tuple[re.Pattern[str], _Replacement]] = [
    # PEM private keys, also when cut off before the END line.
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?"
            r"(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"
        ),
        REDACTED,
    ),
    # scheme://user:password@host — keep the user, drop the password.
    (
        re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):[^\s/?#@]+@"),
        rf"\1:{REDACTED}@",
    ),
    # An Authorization header: whatever follows is a credential.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"(?:(bearer|basic|token|digest)\s+)?[^\s\"',;)\]}>]+"
        ),
        _keep_scheme,
    ),
    # Bearer/Basic credentials elsewhere. A real credential has a digit, a symbol or
    # mixed case inside, which keeps "Bearer bonds" and "Basic setup" intact.
    (
        re.compile(
            r"\b(Bearer|bearer|BEARER|Basic|basic|BASIC)\s+"
            r"(?=[A-Za-z0-9._~+/=-]*(?:[0-9._~+/=-]|[a-z][A-Z]))[A-Za-z0-9._~+/-]{6,}=*"
        ),
        rf"\1 {REDACTED}",
    ),
    # key=value / key: value / "key": "value" where the key ends with a secret word.
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])([\"']?[A-Za-z0-9_.-]*" + _SECRET_KEY + r"[\"']?\s*[:=]\s*)"
            r"(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s\"',;&}\]]+)"
        ),
        _keep_quotes,
    ),
    # JSON Web Tokens: three base64url parts, the first a JSON header.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
    # Provider API keys, by their documented prefixes.
    (
        re.compile(
            r"\b(?:"
            r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic
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
            r")"
        ),
        REDACTED,
    ),
    # An AWS secret access key: 40 base64 characters right after an AWS key id.
    (
        re.compile(r"(\[REDACTED\][\s:,;/|]+)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
        rf"\1{REDACTED}",
    ),
]


def redact(text: str) -> str:
    """Replace credentials in ``text`` with ``[REDACTED]``; leave everything else alone."""
    if not isinstance(text, str):
        raise TypeError(f"redact() takes a str, not {type(text).__name__}")
    for pattern, replacement in _RULES:
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
