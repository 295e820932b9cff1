"""Programming a pod's network namespace: capture rules, the fwmark rule and table 100.

Every command runs as ``nsenter --net=NETNS_PATH …`` through :func:`trio.run_process`, so the
calling process never changes namespace. All three operations are idempotent: they read the
current state first (``iptables-save``, ``ip -j rule``/``route``) and change only what differs.
The host's own network namespace is refused outright: capture rules there would take the node
off the network. The one exception is a VM's node proxy in host mode, which captures its own
host's traffic on purpose and says so (:func:`program_host`, ``host_mode=True``).
"""

from __future__ import annotations

import json
import logging
import os

import trio

from cni import rules

log = logging.getLogger(__name__)

_RULE_SPEC = [
    "fwmark",
    f"{rules.CONN_MARK:#x}/{rules.MARK_MASK:#x}",
    "pref",
    str(rules.RULE_PREF),
    "lookup",
    str(rules.ROUTE_TABLE),
]
_ROUTE_SPEC = ["local", "0.0.0.0/0", "dev", "lo", "table", str(rules.ROUTE_TABLE)]


class NetprogError(RuntimeError):
    """A command inside the pod netns failed; the message carries its stderr."""


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def is_netns(path: str) -> bool:
    """Whether ``path`` is a network namespace file (nsfs), not a stale mount point."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except OSError:
        return False


def _check_target(netns_path: str, *, host_mode: bool = False) -> None:
    if not netns_path or not is_netns(netns_path):
        raise NetprogError(f"{netns_path!r} is not a network namespace")
    if host_mode:
        return  # the caller captures its own host on purpose (a VM in host mode)
    try:
        st = os.stat(netns_path)
    except OSError as e:
        raise NetprogError(f"{netns_path}: {e}") from None
    for host in ("/proc/1/ns/net", "/proc/self/ns/net"):
        try:
            h = os.stat(host)
        except OSError:
            continue
        if (h.st_dev, h.st_ino) == (st.st_dev, st.st_ino):
            raise NetprogError(f"refusing to program the host network namespace ({netns_path})")


async def _run(netns_path: str, argv: list[str], stdin: str | None = None) -> str:
    cmd = ["nsenter", f"--net={netns_path}", *argv]
    try:
        proc = await trio.run_process(
            cmd,
            stdin=stdin.encode() if stdin is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except OSError as e:
        raise NetprogError(f"{' '.join(argv)}: {e}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise NetprogError(f"{' '.join(argv)} in {netns_path} failed ({proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


async def _save(netns_path: str) -> str:
    out = []
    for table in rules.TABLES:
        out.append(await _run(netns_path, ["iptables-save", "-t", table]))
    return "".join(out)


async def _restore(netns_path: str, text: str) -> None:
    await _run(netns_path, ["iptables-restore", "--noflush", "--wait"], stdin=text)


def rule_present(ip_rule_json: str) -> bool:
    """Whether ``ip -j rule show`` output holds our fwmark rule."""
    return _count_rules(ip_rule_json) > 0


def _count_rules(ip_rule_json: str) -> int:
    try:
        entries = json.loads(ip_rule_json or "[]")
    except ValueError:
        return 0
    return sum(
        1
        for e in entries
        if isinstance(e, dict)
        and e.get("priority") == rules.RULE_PREF
        and str(e.get("fwmark")) == f"{rules.CONN_MARK:#x}"
        and str(e.get("fwmask")) == f"{rules.MARK_MASK:#x}"
        and str(e.get("table")) == str(rules.ROUTE_TABLE)
    )


def route_present(ip_route_json: str) -> bool:
    """Whether ``ip -j route show table 100`` output holds the local default route via lo."""
    try:
        entries = json.loads(ip_route_json or "[]")
    except ValueError:
        return False
    return any(
        isinstance(e, dict)
        and e.get("type") == "local"
        and e.get("dst") in ("default", "0.0.0.0/0")
        and e.get("dev") == "lo"
        for e in entries
    )


async def _rule_json(netns_path: str) -> str:
    return await _run(netns_path, ["ip", "-j", "rule", "show"])


async def _route_json(netns_path: str) -> str:
    return await _run(netns_path, ["ip", "-j", "route", "show", "table", str(rules.ROUTE_TABLE)])


async def program_pod(netns_path: str, *, dns: bool = False) -> None:
    """Install the capture in the pod netns; a no-op when it is already there."""
    _check_target(netns_path)
    await _program(netns_path, rules.pod_rules(dns=dns))


async def program_host(netns_path: str, rule_set: str) -> None:
    """Host mode: install ``rule_set`` (:func:`cni.rules.host_rules`) in the VM's own netns,
    which may be the host's; a no-op when it is already there."""
    _check_target(netns_path, host_mode=True)
    await _program(netns_path, rule_set)


async def _program(netns_path: str, rule_set: str) -> None:
    saved = await _save(netns_path)
    if not rules.rules_match(saved, rule_set):
        if rules.has_pod_rules(saved):
            # half-programmed or stale (e.g. different DNS setting): start from clean
            await _restore(netns_path, rules.pod_cleanup_rules(saved))
        await _restore(netns_path, rule_set)
    n = _count_rules(await _rule_json(netns_path))
    if n == 0:
        await _run(netns_path, ["ip", "rule", "add", *_RULE_SPEC])
    # the route must be "local" through lo so marked replies are delivered to the proxy
    await _run(netns_path, ["ip", "route", "replace", *_ROUTE_SPEC])
    log.info("programmed capture in %s", netns_path)


async def unprogram_pod(netns_path: str, *, host_mode: bool = False) -> None:
    """Remove the capture from the pod netns; a missing netns or missing rules is fine.

    ``host_mode``: the VM's own netns (see :func:`program_host`), which may be the host's.
    """
    if not netns_path or not is_netns(netns_path):
        log.info("netns %r is gone: nothing to unprogram", netns_path)
        return
    _check_target(netns_path, host_mode=host_mode)
    saved = await _save(netns_path)
    cleanup = rules.pod_cleanup_rules(saved)
    if cleanup:
        await _restore(netns_path, cleanup)
    for _ in range(_count_rules(await _rule_json(netns_path))):
        await _run(netns_path, ["ip", "rule", "del", *_RULE_SPEC])
    if route_present(await _route_json(netns_path)):
        await _run(netns_path, ["ip", "route", "del", *_ROUTE_SPEC])
    log.info("removed capture from %s", netns_path)


async def is_programmed(
    netns_path: str, *, dns: bool = False, host_rule_set: str | None = None
) -> bool:
    """Whether the full capture (rules, fwmark rule, route) is in place.

    With ``host_rule_set`` the host-mode capture is checked (see :func:`program_host`).
    """
    if not is_netns(netns_path):
        return False
    _check_target(netns_path, host_mode=host_rule_set is not None)
    wanted = host_rule_set if host_rule_set is not None else rules.pod_rules(dns=dns)
    return (
        rules.rules_match(await _save(netns_path), wanted)
        and rule_present(await _rule_json(netns_path))
        and route_present(await _route_json(netns_path))
    )


__all__ = [
    "NetprogError",
    "is_netns",
    "is_programmed",
    "program_host",
    "program_pod",
    "route_present",
    "rule_present",
    "unprogram_pod",
]
