"""Store URIs in one place: which file a ``sqlite``/``journal`` URI names, and hiding credentials.

Every caller that needs the file behind a store URI (does it exist, make it absolute, make its
folder) or prints/stores a URI goes through here, so a parsing fix (``?timeout=``,
``sqlite+pysqlite://``) or a new secret form reaches all of them at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

JOURNAL = "journal:///"
_SQLITE = re.compile(r"^(?P<scheme>sqlite(?:\+[A-Za-z0-9_]+)?):///(?P<path>[^?]*)(?P<query>\?.*)?$")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite[+driver]:///path[?query]`` URI (None: not sqlite, or in memory)."""
    m = _SQLITE.match(uri.strip())
    if not m or m["path"] in ("", ":memory:"):
        return None
    return Path(m["path"]).expanduser()


def journal_file(uri: str) -> Path | None:
    """The log file of Optuna's ``journal:///path`` URI."""
    return Path(uri.strip().removeprefix(JOURNAL)).expanduser() if uri.strip().startswith(JOURNAL) else None


def store_file(uri: str) -> Path | None:
    """The local file behind a file store URI (sqlite or journal); None for a server store."""
    return sqlite_file(uri) or journal_file(uri)


def is_sqlite(uri: str) -> bool:
    return uri.strip().startswith("sqlite")


def store_exists(uri: str) -> bool:
    """False only for a file store whose file is missing (read-only commands must not create it)."""
    path = store_file(uri)
    return path is None or path.is_file()


def absolute(uri: str) -> str:
    """A relative ``sqlite:///rel.db[?q]`` or ``journal:///rel.log`` -> the same file by absolute path."""
    uri = uri.strip()
    m = _SQLITE.match(uri)
    if m and m["path"] not in ("", ":memory:"):
        return f"{m['scheme']}:///{Path(m['path']).expanduser().resolve()}{m['query'] or ''}"
    path = journal_file(uri)
    if path is not None:
        return JOURNAL + str(path.resolve())
    return uri


# credentials ------------------------------------------------------------------------------
MASK = "***"
_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/?#\s'\"<>]*)")
_SECRET_WORDS = r"(?:token|secret|password|passwd|pwd|key|signature|credential|auth)"
_SECRET_QUERY = re.compile(rf"(?P<key>[?&;][A-Za-z0-9_.-]*{_SECRET_WORDS}[A-Za-z0-9_.-]*)=(?P<val>[^&#\s'\"]+)",
                           re.IGNORECASE)
# NAME=value / NAME: value where NAME looks like a secret (environment dumps, "password=..." in messages)
_SECRET_ASSIGN = re.compile(rf"(?P<key>\b[A-Za-z0-9_]*{_SECRET_WORDS}[A-Za-z0-9_]*\s*[=:]\s*)(?P<val>[^\s'\",;&]+)",
                            re.IGNORECASE)
# a raw '/' in a password (AWS secret keys have them) ends the authority above: 's3://KEY:SE/CRET@b';
# the password runs to the *last* '@' that a host follows, so 'u:p@ss/w0rd@db:5432/x' hides 'p@ss/w0rd'
_SLASHED_PW = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]+:)(?!\d+(?:[/?#\s]|$))(?P<pw>[^\s'\"]+)@"
                         r"(?=[A-Za-z0-9.\[\]-]+(?::\d+)?(?:[/?#\s'\"]|$))")
_TOKEN_MIN = 16  # a colon-less userinfo this long is a token (https://TOKEN@host), not a user name


def _mask_authority(m: re.Match) -> str:
    auth = m["auth"]
    if "@" not in auth:
        return m.group(0)
    userinfo, host = auth.rsplit("@", 1)  # the host has no '@': a password may ('user:p@ss@host')
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{m['scheme']}{user}:{MASK}@{host}"  # also ':TOKEN@' -> ':***@'
    if len(userinfo) >= _TOKEN_MIN:
        return f"{m['scheme']}{MASK}@{host}"
    return m.group(0)


def redact(text: str) -> str:
    """Hide credentials in any text holding URIs: ``user:pw@`` and ``:TOKEN@`` userinfo (a password
    may contain '@'), bare ``TOKEN@`` userinfo, secret-looking query parameters
    (``?token=``, ``&X-Amz-Signature=``) and ``SECRET_NAME=value`` assignments."""
    text = _AUTHORITY.sub(_mask_authority, str(text))
    text = _SLASHED_PW.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", text)
    return _SECRET_ASSIGN.sub(lambda m: m["key"] + (m["val"] if m["val"] == MASK else MASK), text)


def has_credentials(uri: str) -> bool:
    return redact(uri) != uri


def without_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, user, pw); other URIs unchanged (None, None)."""
    m = _AUTHORITY.match(uri.strip())
    if not m or "@" not in m["auth"]:
        return uri, None, None
    userinfo, host = m["auth"].rsplit("@", 1)
    user, _, pw = userinfo.partition(":")
    return m["scheme"] + host + uri.strip()[m.end():], user or None, pw or None


class RedactingFilter:
    """A logging filter that redacts each record's final message (arguments included)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:  # tracebacks print str(exc) later
            record.exc_text = redact(_format_exc(record))
        return True


def _format_exc(record) -> str:
    import logging

    return logging.Formatter().formatException(record.exc_info)


def install_log_redaction() -> None:
    """Redact every record that reaches the root logger's handlers (and their future records)."""
    import logging

    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# credentials kept out of files -------------------------------------------------------------
# What the product writes holds URIs with their credentials masked; the live process finds the
# full URI again here: one it was given on this run (``remember``), or the environment.
SECRET_ENV = ("MLFLOW_TRACKING_URI", "OSCQAT_OPTUNA_STORAGE")
_remembered: dict[str, str] = {}


def remember(uri: str) -> str:
    """Keep a URI's credentials in this process only; returns the masked URI to store instead."""
    masked = redact(uri)
    if masked != uri:
        _remembered[masked] = uri
    return masked


def reveal(uri: str) -> str:
    """The full URI for a masked one (``user:***@``): remembered in this process, or from
    MLFLOW_TRACKING_URI / OSCQAT_OPTUNA_STORAGE when its masked form is this one."""
    if MASK not in uri:
        return uri
    if uri in _remembered:
        return _remembered[uri]
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if value and redact(value) == uri:
            return value
    raise CredentialsMissing(f"{uri} is stored without its credentials; set {' or '.join(SECRET_ENV)} to the "
                             f"full URI (with credentials) in the environment")


class CredentialsMissing(ValueError):
    """A masked URI whose credentials this process was not given."""
