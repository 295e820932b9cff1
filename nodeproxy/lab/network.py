"""The lab's network: namespaces, the underlay bridge, node links and routes, iptables.

Every command runs inside a namespace the lab created (``ip -n NAME …``, ``ip netns exec``),
never in the host's own. These are blocking calls: the supervisor runs them on a worker
thread. :func:`sweep` removes whatever a lab with a given prefix left behind, even after the
supervisor was killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from nodeproxy.lab.spec import (
    BRIDGE,
    POSTROUTING_CHAIN,
    SERVICES_CHAIN,
    UNDERLAY_GATEWAY,
    VM,
    Node,
    node_netns,
    underlay_netns,
    vm_netns,
)
from nodeproxy.model import SERVICE_CIDR

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")


class NetworkError(RuntimeError):
    pass


def run(argv: list[str], input: bytes | None = None, check: bool = True) -> str:
    """Run a command; on failure raise :class:`NetworkError` with its stderr."""
    log.debug("run: %s", " ".join(argv))
    proc = subprocess.run(argv, input=input, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise NetworkError(f"{' '.join(argv)}: {err or f'exit status {proc.returncode}'}")
    return proc.stdout.decode(errors="replace")


def netns_exec(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def add_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        raise NetworkError(f"network namespace {name} already exists")
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def del_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "del", name], check=False)


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sysctl(ns: str, key: str, value: str) -> None:
    # /proc/sys/net is per network namespace: write it from a process inside ``ns``
    run(netns_exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))


def create_underlay(prefix: str) -> None:
    ns = underlay_netns(prefix)
    add_netns(ns)
    run(["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", ns, "addr", "add", f"{UNDERLAY_GATEWAY}/24", "dev", BRIDGE])
    run(["ip", "-n", ns, "link", "set", BRIDGE, "up"])


def create_node(prefix: str, node: Node, nodes: Iterable[Node]) -> None:
    """Node netns, its veth on the underlay bridge, forwarding, routes to other pod CIDRs."""
    u, ns = underlay_netns(prefix), node_netns(prefix, node.name)
    add_netns(ns)
    veth = f"vn{node.index}"
    run(["ip", "-n", u, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
         "netns", ns])
    run(["ip", "-n", u, "link", "set", veth, "master", BRIDGE])
    run(["ip", "-n", u, "link", "set", veth, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{node.underlay_ip}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    sysctl(ns, "net.ipv4.ip_forward", "1")
    # the underlay (where the control plane listens) routes back to this node's pods, so a pod
    # that talks to the control plane itself (an L7 gateway) gets its answers
    run(["ip", "-n", u, "route", "add", node.pod_cidr, "via", node.underlay_ip])
    for other in nodes:
        if other.name != node.name:
            run(["ip", "-n", ns, "route", "add", other.pod_cidr, "via", other.underlay_ip])
    # a route for the service range so the node's own connections pass the routing decision
    # before nat OUTPUT rewrites them (a real node would use its default route)
    run(["ip", "-n", ns, "route", "add", SERVICE_CIDR, "via", UNDERLAY_GATEWAY])
    # the kube-proxy chains, filled by apply_kube_proxy; the jumps are installed once
    rules = (
        "*nat\n"
        f":{SERVICES_CHAIN} - [0:0]\n"
        f":{POSTROUTING_CHAIN} - [0:0]\n"
        f"-A PREROUTING -j {SERVICES_CHAIN}\n"
        f"-A OUTPUT -j {SERVICES_CHAIN}\n"
        f"-A POSTROUTING -j {POSTROUTING_CHAIN}\n"
        "COMMIT\n"
    )
    run(netns_exec(ns, ["iptables-restore", "--noflush", "--wait"]), input=rules.encode())


def create_vm(prefix: str, vm: VM, nodes: Iterable[Node]) -> None:
    """A VM: its own netns on the underlay bridge, routes to every node's pod CIDR.

    The nodes need no route back: the VM's address is on their underlay subnet.
    """
    u, ns = underlay_netns(prefix), vm_netns(prefix, vm.name)
    add_netns(ns)
    veth = f"vv{vm.index}"
    run(["ip", "-n", u, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
         "netns", ns])
    run(["ip", "-n", u, "link", "set", veth, "master", BRIDGE])
    run(["ip", "-n", u, "link", "set", veth, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{vm.underlay_ip}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    for node in nodes:
        run(["ip", "-n", ns, "route", "add", node.pod_cidr, "via", node.underlay_ip])
    # service VIPs must pass the routing decision before the capture's nat OUTPUT redirect
    run(["ip", "-n", ns, "route", "add", SERVICE_CIDR, "via", UNDERLAY_GATEWAY])


def apply_kube_proxy(ns: str, rules: str) -> None:
    run(netns_exec(ns, ["iptables-restore", "--noflush", "--wait"]), input=rules.encode())


# -- /etc/netns --------------------------------------------------------------------------


def write_in_place(path: Path, text: str) -> None:
    """Rewrite without replacing the inode: ``ip netns exec`` bind-mounted this very file
    over /etc/hosts of running processes, and a new inode would not reach them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_etc(ns: str, hosts: str, resolv: str) -> None:
    d = ETC_NETNS_DIR / ns
    write_in_place(d / "hosts", hosts)
    write_in_place(d / "resolv.conf", resolv)


def remove_etc(ns: str) -> None:
    shutil.rmtree(ETC_NETNS_DIR / ns, ignore_errors=True)


# -- processes ---------------------------------------------------------------------------


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(names: Iterable[str]) -> list[int]:
    """Processes whose network namespace is one of ``names`` (in /run/netns)."""
    ids = {i for n in names if (i := _ns_id(str(NETNS_DIR / n))) is not None}
    if not ids:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _ns_id(f"/proc/{entry}/ns/net") in ids:
            out.append(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # a zombie has exited already: its state letter is Z
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids: Iterable[int], grace: float = 3.0) -> None:
    pids = [p for p in pids if pid_alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def sweep(prefix: str, lab_dir: Path | None) -> list[str]:
    """Remove everything a lab with ``prefix`` left: processes in its namespaces, the
    namespaces, their /etc/netns dirs and the lab dir. Returns what was removed."""
    removed = []
    names = list_netns(prefix)
    pids = pids_in_netns(names)
    if pids:
        kill_pids(pids)
        removed.append(f"{len(pids)} processes")
    for n in names:
        del_netns(n)
        removed.append(f"netns {n}")
    if ETC_NETNS_DIR.is_dir():
        for d in ETC_NETNS_DIR.iterdir():
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"{d}")
    if lab_dir is not None and lab_dir.exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(f"{lab_dir}")
    return removed
