"""The h2 library as the tests' independent HTTP/2 peer: its DATA-frame repr made cheap.

h2 4.4 formats repr(frame) for every received frame (for a trace log that is off), and a DATA
frame's repr serialises and hex-encodes its whole body: 4x-40x slower receives in the tests
that use h2 as a client or server. We make the DATA body repr constant-time, only for the
versions we checked this against. (Only tests and benchmark load generators use h2 this way;
the proxies run our own engine, ``ztunnel/hbone/frames.py``, and never import h2.)
"""

from __future__ import annotations

import logging

import h2
import hyperframe
import hyperframe.frame

log = logging.getLogger(__name__)

_REPR_PATCHED_VERSIONS = {("4.4.1", "6.1.0")}


def _cheap_data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def install_data_repr_workaround() -> bool:
    """Make ``repr(DataFrame)`` cheap; True if the workaround is in effect."""
    cls = hyperframe.frame.DataFrame
    if cls.__dict__.get("_body_repr") is _cheap_data_body_repr:
        return True
    versions = (h2.__version__, hyperframe.__version__)
    if versions not in _REPR_PATCHED_VERSIONS:
        log.warning("h2/hyperframe %s not checked for the DATA repr workaround; not applied",
                    versions)
        return False
    if "_body_repr" in cls.__dict__:  # upstream changed the class: leave it alone
        return False
    cls._body_repr = _cheap_data_body_repr  # type: ignore[method-assign]
    return True


DATA_REPR_WORKAROUND = install_data_repr_workaround()
