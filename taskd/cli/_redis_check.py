"""``taskd serve --redis``: the URL and the server checked before anything starts, so
that a Redis that cannot be used is one line in taskd's words naming the flag (exit 1),
not a traceback or N workers' lines in Redis's words."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ..engine.redis.space import check_redis_url
from ._common import EXIT_START, CliError

__all__ = ["check_reachable", "check_url", "safe_url"]


def safe_url(url: str) -> str:
    """The URL without its password, for the log and for errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable: hide whatever sits between the scheme and the last "@".
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


_REDIS_FLAG = "--redis (env TASKD_REDIS)"


def check_url(url: str, flag: str = _REDIS_FLAG) -> None:
    """A ``--redis`` URL redis-py will take, else one line naming the flag (exit 1).

    redis-py's own errors ("Port could not be cast to integer value") name neither
    the flag nor the fix, and surface only once the app starts."""
    shown = safe_url(url)
    try:
        check_redis_url(url)
    except ValueError:
        raise CliError(
            f"{flag} must be a redis://, rediss:// or unix:// URL, not {shown!r}",
            EXIT_START,
        ) from None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        problem = (
            "its IPv6 address is not closed by ']'"
            if "IPv6" in str(exc)
            else "its port is not a number from 0 to 65535"
        )
        raise CliError(
            f"{flag}: {shown!r} is not a usable URL: {problem} (redis://[:PASSWORD@]HOST:PORT/DB)",
            EXIT_START,
        ) from None
    if parts.scheme == "unix":
        if not parts.path:
            raise CliError(f"{flag}: {shown!r} names no socket path (unix:///PATH)", EXIT_START)
        return
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise CliError(
            f"{flag}: {shown!r}: the database after the port must be a number "
            "(redis://HOST:PORT/0)",
            EXIT_START,
        )


def check_reachable(url: str, flag: str = _REDIS_FLAG) -> None:
    """Ping Redis once before serving: a Redis that cannot be reached, wants a
    password or refuses the one given is one line in taskd's words naming the flag,
    instead of Redis's own ("NOAUTH HELLO must be called with the client already
    authenticated …")."""
    try:
        import redis
        from redis.exceptions import AuthenticationError, RedisError
    except ImportError:  # pragma: no cover - depends on the installation
        raise CliError(
            "--redis needs the redis package: pip install 'aiotaskd[redis]'", EXIT_START
        ) from None

    parts = urlsplit(url)
    where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
    client = redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=5.0, retry=None, health_check_interval=0
    )
    try:
        client.ping()
    except AuthenticationError as exc:
        text = str(exc).lower()
        if "without any password" in text or "no password is set" in text:
            problem = "has no password set but the URL gives one: remove it from the URL"
        elif parts.password is None:
            problem = "requires a password: give it in the URL (redis://:PASSWORD@HOST:PORT/0)"
        else:
            problem = "refused the user name or password in the URL (wrong password?)"
        raise CliError(f"{flag}: Redis at {where} {problem}", EXIT_START) from None
    except (RedisError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__
        reason = (
            cause.strerror.lower()
            if isinstance(cause, OSError) and cause.strerror
            else "it did not answer in 5 s"
            if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
            else " ".join(str(exc).split())
        )
        raise CliError(
            f"{flag}: the shared store (Redis) at {where} cannot be reached: {reason}",
            EXIT_START,
        ) from None
    finally:
        client.close()
