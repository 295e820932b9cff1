"""The capture rule sets applied inside a pod's network namespace (pure: text in, text out).

The rules are Istio ambient's in-pod rules (istio ``cni/pkg/iptables/testdata/default.golden``):
the pod's own outbound TCP is redirected to the node proxy's 15001, inbound TCP (except HBONE on
15008) to 15006; the proxy's own sockets carry mark 0x539 and are exempt; connections the proxy
made get connmark 0x111 so that the app's replies are routed back to the proxy through table 100.

They are applied with ``iptables-restore --noflush``, so they must not touch rules of other
chains; :func:`pod_cleanup_rules` removes exactly what :func:`pod_rules` (or :func:`host_rules`)
added.

Host mode (a VM that is its own workload) uses the same generator in the VM's own network
namespace: the same chains, marks and table 100, without the kubelet-probe exemption (there is
no kubelet), and with exemptions a host needs that a pod does not: inbound SSH and the node
proxy's own admin/metrics/readiness ports, outbound the control plane (the proxy's own
discovery and CA connections are not marked sockets), and in both directions every packet that
is not a SYN. A host has connections that are older than its rules (an SSH session, the
proxy's own discovery stream); the netns's conntrack starts when the nat rules arrive and picks
those up mid-stream as new, and without that exemption their next packet would be redirected
to a port that knows nothing of them (and answered with a reset). Pods never have such
connections: their rules come before their first packet.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable

PROXY_MARK = 0x539  # SO_MARK of every socket the node proxy opens in the data path
CONN_MARK = 0x111  # connmark of connections the proxy made; replies go back via table 100
MARK_MASK = 0xFFF
OUTBOUND_PORT = 15001
INBOUND_PLAIN_PORT = 15006
HBONE_PORT = 15008
DNS_PROXY_PORT = 15053
PROBE_ADDRESS = "169.254.7.127"  # the host SNATs kubelet probes to it: probes skip capture
ROUTE_TABLE = 100
RULE_PREF = 32764
SSH_PORT = 22

POD_MODE = "pod"
HOST_MODE = "host"
MODES = (POD_MODE, HOST_MODE)
# host mode: inbound ports never captured: SSH, and the node proxy's admin, metrics, readiness
HOST_INBOUND_EXEMPT_PORTS = (SSH_PORT, 15000, 15020, 15021)
# a first packet that is not a SYN: a connection older than the rules, picked up mid-stream
_NOT_SYN = "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT"

PRERT_CHAIN = "ISTIO_PRERT"
OUTPUT_CHAIN = "ISTIO_OUTPUT"
CHAINS = (PRERT_CHAIN, OUTPUT_CHAIN)
TABLES = ("mangle", "nat")
# builtin chain → our chain it jumps to
JUMPS = {"PREROUTING": PRERT_CHAIN, "OUTPUT": OUTPUT_CHAIN}

_PM = f"{PROXY_MARK:#x}/{MARK_MASK:#x}"
_CM = f"{CONN_MARK:#x}/{MARK_MASK:#x}"


def pod_rules(*, dns: bool = False) -> str:
    """The ``iptables-restore --noflush`` input that installs the capture (reference order)."""
    return capture_rules(POD_MODE, dns=dns)


def host_rules(
    *,
    inbound_exempt_ports: Iterable[int] = HOST_INBOUND_EXEMPT_PORTS,
    outbound_exempt: Iterable[tuple[str, int]] = (),
    dns: bool = False,
) -> str:
    """The capture of a host's (a VM's) own traffic, for its own network namespace.

    ``outbound_exempt`` lists (IP, port) destinations left alone, e.g. the control plane.
    """
    return capture_rules(
        HOST_MODE,
        dns=dns,
        inbound_exempt_ports=inbound_exempt_ports,
        outbound_exempt=outbound_exempt,
    )


def _exempt_ports(ports: Iterable[int]) -> list[int]:
    out: list[int] = []
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ValueError(f"exempt port {p!r} is not a port number")
        if p in (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT):
            raise ValueError(f"port {p} is the node proxy's own capture port: cannot exempt it")
        if p not in out:
            out.append(p)
    return out


def _exempt_destinations(dests: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for ip, port in dests:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise ValueError(f"exempt destination {ip!r} is not an IPv4 address") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"exempt destination port {port!r} is not a port number")
        if (str(addr), port) not in out:
            out.append((str(addr), port))
    return out


def capture_rules(
    mode: str = POD_MODE,
    *,
    dns: bool = False,
    inbound_exempt_ports: Iterable[int] = (),
    outbound_exempt: Iterable[tuple[str, int]] = (),
) -> str:
    """The one rule generator: ``pod`` mode (the reference rules) or ``host`` mode.

    Exemptions go before the REDIRECTs: inbound ports in the PREROUTING chain, outbound
    (IP, port) destinations in the OUTPUT chain. Raises ValueError for a bad mode or port.
    """
    if mode not in MODES:
        raise ValueError(f"capture mode {mode!r} is not one of {', '.join(MODES)}")
    in_ports = _exempt_ports(inbound_exempt_ports)
    out_dests = _exempt_destinations(outbound_exempt)
    lines = [
        "* mangle",
        f"-N {PRERT_CHAIN}",
        f"-N {OUTPUT_CHAIN}",
        f"-A PREROUTING -j {PRERT_CHAIN}",
        f"-A OUTPUT -j {OUTPUT_CHAIN}",
        f"-A {PRERT_CHAIN} -m mark --mark {_PM} -j CONNMARK --set-xmark {_CM}",
        f"-A {OUTPUT_CHAIN} -m connmark --mark {_CM} -j CONNMARK --restore-mark"
        " --nfmask 0xffffffff --ctmask 0xffffffff",
        "COMMIT",
        "* nat",
        f"-N {PRERT_CHAIN}",
        f"-N {OUTPUT_CHAIN}",
        f"-A OUTPUT -j {OUTPUT_CHAIN}",
        f"-A PREROUTING -j {PRERT_CHAIN}",
    ]
    if mode == POD_MODE:
        # the host SNATs kubelet probes to PROBE_ADDRESS; a VM has no kubelet
        lines += [
            f"-A {PRERT_CHAIN} -s {PROBE_ADDRESS} -p tcp -m tcp -j ACCEPT",
            f"-A {OUTPUT_CHAIN} -d {PROBE_ADDRESS} -p tcp -m tcp -j ACCEPT",
        ]
    else:
        lines += [f"-A {PRERT_CHAIN} {_NOT_SYN}", f"-A {OUTPUT_CHAIN} {_NOT_SYN}"]
    lines += [f"-A {PRERT_CHAIN} -p tcp -m tcp --dport {p} -j ACCEPT" for p in in_ports]
    lines.append(
        f"-A {PRERT_CHAIN} ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} -m mark ! --mark {_PM}"
        f" -j REDIRECT --to-ports {INBOUND_PLAIN_PORT}"
    )
    if dns:
        lines += [
            f"-A {OUTPUT_CHAIN} ! -o lo -p udp -m mark ! --mark {_PM} -m udp --dport 53"
            f" -j REDIRECT --to-port {DNS_PROXY_PORT}",
            f"-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark {_PM}"
            f" -j REDIRECT --to-ports {DNS_PROXY_PORT}",
        ]
    lines += [
        f"-A {OUTPUT_CHAIN} -p tcp -m mark --mark {_CM} -j ACCEPT",
        f"-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
    ]
    lines += [
        f"-A {OUTPUT_CHAIN} -d {ip}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
        for ip, port in out_dests
    ]
    lines += [
        f"-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {_PM}"
        f" -j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def pod_cleanup_rules(saved: str | None = None) -> str:
    """The ``iptables-restore --noflush`` input that removes what :func:`pod_rules` added.

    Without ``saved`` it is the full removal (it fails if something is already gone, because
    iptables-restore rejects deleting what does not exist). With ``saved`` (``iptables-save``
    output of the netns) only what is present is removed, so a half-programmed netns is
    cleaned too; the result is empty when nothing of ours is there.
    """
    parsed = parse_save(saved) if saved is not None else None
    out: list[str] = []
    for table in TABLES:
        body: list[str] = []
        for builtin, chain in JUMPS.items():
            jump = f"-A {builtin} -j {chain}"
            count = 1 if parsed is None else parsed.get(table, _Table()).rules.count(jump)
            body += [f"-D {builtin} -j {chain}"] * count
        for chain in CHAINS:
            if parsed is None or chain in parsed.get(table, _Table()).chains:
                body.append(f"-F {chain}")
        for chain in CHAINS:
            if parsed is None or chain in parsed.get(table, _Table()).chains:
                body.append(f"-X {chain}")
        if body:
            out += [f"* {table}", *body, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


# -- reading iptables-save -------------------------------------------------------------------


class _Table:
    def __init__(self) -> None:
        self.chains: set[str] = set()
        self.rules: list[str] = []


def parse_save(text: str) -> dict[str, _Table]:
    """``iptables-save`` (or ``iptables-restore`` input) → table → chains and ``-A`` lines."""
    tables: dict[str, _Table] = {}
    current: _Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), _Table())
        elif current is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.add(line[1:].split()[0])
        elif line.startswith("-N "):
            current.chains.add(line.split()[1])
        elif line.startswith("-A "):
            current.rules.append(" ".join(line.split()))
    return tables


def _normalize(rule: str) -> tuple[str, ...]:
    """A rule in a form that compares equal to what iptables-save prints back for it.

    iptables-save adds implicit ``-m tcp``/``-m udp``, ``/32`` suffixes and prints
    ``--to-ports``; option order may differ, so options are compared as a sorted set of
    groups (an option, its values, and a preceding ``!``).
    """
    tokens = rule.split()
    cleaned: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t == "-m" and i + 1 < len(tokens) and tokens[i + 1] in ("tcp", "udp"):
            i += 2
            continue
        if t == "--to-port":
            t = "--to-ports"
        if cleaned and cleaned[-1] in ("-s", "-d") and re.fullmatch(r"[\d.]+", t):
            t += "/32"
        cleaned.append(t)
        i += 1
    groups: list[str] = []
    neg = False
    for t in cleaned:
        if t == "!":
            neg = True
        elif t.startswith("-") or not groups:
            groups.append(("! " if neg else "") + t)
            neg = False
        else:
            groups[-1] += " " + t
    return tuple(sorted(groups))


def _ours(rules: list[str]) -> dict[str, list[tuple[str, ...]]]:
    """Our rules per chain (jumps from builtins to our chains, and our chains' rules)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for rule in rules:
        parts = rule.split()
        chain = parts[1]
        if chain in CHAINS or (chain in JUMPS and "-j" in parts and parts[-1] in CHAINS):
            out.setdefault(chain, []).append(_normalize(rule))
    return out


def has_pod_rules(saved: str) -> bool:
    """Whether anything of ours (chain or jump) is present in ``iptables-save`` output."""
    for table in parse_save(saved).values():
        if table.chains & set(CHAINS) or _ours(table.rules):
            return True
    return False


def pod_rules_match(saved: str, *, dns: bool = False) -> bool:
    """Whether ``iptables-save`` output holds exactly our rule set, in order, once."""
    return rules_match(saved, pod_rules(dns=dns))


def rules_match(saved: str, wanted: str) -> bool:
    """Whether ``iptables-save`` output holds exactly ``wanted`` (a rule set made here)."""
    want, got = parse_save(wanted), parse_save(saved)
    for table in TABLES:
        w, g = want[table], got.get(table, _Table())
        if not set(CHAINS) <= g.chains:
            return False
        ow, og = _ours(w.rules), _ours(g.rules)
        # builtin chains: our jump exactly once each (other rules there are not ours)
        for builtin in JUMPS:
            if Counter(og.get(builtin, [])) != Counter(ow.get(builtin, [])):
                return False
        for chain in CHAINS:
            if og.get(chain, []) != ow.get(chain, []):
                return False
    return True
