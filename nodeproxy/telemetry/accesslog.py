"""Access log: one "connection complete" line per proxied connection, as ztunnel writes it.

Lines are logfmt-like (``key=value``, values quoted when they hold spaces, quotes or ``=``)
and go to the logger ``nodeproxy.access``, so the process's logging setup decides where.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("nodeproxy.access")
log = logging.getLogger(__name__)

MESSAGE = "connection complete"

# the order ztunnel prints them in; anything else follows in the order given
FIELDS = (
    "src.addr",
    "src.workload",
    "src.namespace",
    "src.identity",
    "dst.addr",
    "dst.hbone_addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "direction",
    "bytes_sent",
    "bytes_recv",
    "duration",
    "response_flags",
    "error",
)

# keyword-friendly spellings accepted by log_connection (``src_addr=`` → ``src.addr``)
_ALIASES = {f.replace(".", "_"): f for f in FIELDS}


_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_FIELD_ORDER = {f: i for i, f in enumerate(FIELDS)}


def _value(key: str, value: Any) -> str:
    if type(value) is str:
        text = value
    elif key == "duration" and isinstance(value, int | float) and not isinstance(value, bool):
        text = f"{round(value)}ms"
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    else:
        text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text) is not None or not text.isprintable():
        escaped = (
            text.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
        )
        return f'"{escaped}"'
    return text


# The text of string values already seen (names, identities, addresses repeat from one
# connection to the next): quoting is decided once per value.
_TEXT: dict[str, str] = {}
_TEXT_MAX = 2048


def _text(key: str, value: Any) -> str:
    if type(value) is str:
        text = _TEXT.get(value)
        if text is None:
            text = _value(key, value)
            if len(_TEXT) >= _TEXT_MAX:
                _TEXT.clear()
            _TEXT[value] = text
        return text
    if type(value) is int and key != "duration":
        return str(value)
    return _value(key, value)


def format_entry(entry: Mapping[str, Any]) -> str:
    """``key=value`` pairs, known fields first, the rest in the order given; ``None`` values
    are left out."""
    get = entry.get
    words = [f"{k}={_text(k, v)}" for k in FIELDS if (v := get(k)) is not None]
    if len(entry) > len(words):  # fields of its own, or some left out
        order = _FIELD_ORDER
        words += [f"{k}={_text(k, v)}" for k, v in entry.items()
                  if v is not None and k not in order]
    return " ".join(words)


def log_connection(**fields: Any) -> None:
    """Log one finished connection. Keys may use ``_`` for ``.`` (``src_addr``).

    ``duration`` is in milliseconds. Never raises: the access log must not break the relay.
    """
    try:
        if not logger.isEnabledFor(logging.INFO):
            return
        entry = {_ALIASES.get(k, k): v for k, v in fields.items()}
        # makeRecord + handle rather than info(): info() walks the stack (findCaller) for a
        # source line that an access log line has no use for, on every connection.
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, "%s %s", (MESSAGE, format_entry(entry)), None
        )
        logger.handle(record)
    except Exception:
        log.exception("access log entry dropped")


def parse_line(line: str) -> dict[str, str] | None:
    """The fields of one access-log line (as :func:`format_entry` wrote them), else None."""
    at = line.find(MESSAGE + " ")
    if at < 0:
        return None
    try:
        words = shlex.split(line[at + len(MESSAGE) + 1 :], posix=True)
    except ValueError:
        return None
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out
