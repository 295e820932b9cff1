"""Entering network namespaces.

Python 3.11 has no ``os.setns``; libc's ``setns(2)`` through ctypes does the job. A thread
that enters a namespace must come back to its own before it is reused, so :func:`run_in_netns`
always restores the original namespace, and callers from trio go through
``trio.to_thread.run_sync`` (the setns affects only the calling thread).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """Call ``fn`` with the calling thread inside the netns ``netns_fd``, then return."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        setns(netns_fd)
        try:
            return fn()
        finally:
            setns(own)
    finally:
        os.close(own)


async def in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """Async form of :func:`run_in_netns`, on a worker thread."""
    return await trio.to_thread.run_sync(run_in_netns, netns_fd, fn)


def netns_id(fd: int) -> tuple[int, int]:
    """A namespace's identity: (st_dev, st_ino) of its nsfs file."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)
