"""Host-mode capture rules: exact text, and what they do in a real "VM" network namespace."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from cni import netprog, rules
from nodeproxy.netns import run_in_netns
from ztunnel.sockets import listener, original_dst

HOST_RULES = """\
* mangle
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
* nat
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 22 -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15000 -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15020 -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15021 -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT -d 10.250.0.1/32 -p tcp -m tcp --dport 15012 -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
"""  # noqa: E501


def test_host_rules_text():
    assert rules.host_rules(outbound_exempt=[("10.250.0.1", 15012)]) == HOST_RULES


def test_host_and_pod_rules_come_from_one_generator():
    assert rules.capture_rules("pod") == rules.pod_rules()
    assert rules.capture_rules(
        "host", inbound_exempt_ports=rules.HOST_INBOUND_EXEMPT_PORTS,
        outbound_exempt=[("10.250.0.1", 15012)],
    ) == HOST_RULES
    # host mode has no kubelet-probe exemption; pod mode has it
    assert "169.254.7.127" in rules.pod_rules() and "169.254.7.127" not in HOST_RULES
    # the same chains: the pod cleanup removes the host rules too
    assert rules.pod_cleanup_rules(HOST_RULES) == rules.pod_cleanup_rules()


def test_host_rules_exemptions_can_be_changed():
    text = rules.host_rules(inbound_exempt_ports=[2222])
    assert "--dport 2222 -j ACCEPT" in text and "--dport 22 " not in text
    assert "--dport 15012" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inbound_exempt_ports": [15008]}, "capture port"),
        ({"inbound_exempt_ports": [15006]}, "capture port"),
        ({"inbound_exempt_ports": [0]}, "not a port number"),
        ({"outbound_exempt": [("cp.example", 15012)]}, "not an IPv4 address"),
        ({"outbound_exempt": [("10.0.0.1", 99999)]}, "not a port number"),
    ],
)
def test_bad_exemptions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rules.host_rules(**kwargs)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="capture mode"):
        rules.capture_rules("sidecar")


async def test_pod_programming_still_refuses_the_host_netns():
    with pytest.raises(netprog.NetprogError, match="refusing"):
        await netprog.program_pod(f"/proc/{os.getpid()}/ns/net")


# -- in a real network namespace -------------------------------------------------------------

VM_IP, PEER_IP = "10.98.0.1", "10.98.0.2"


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Two netns joined by a veth: the "VM" (captured) and a peer on its network."""
    tag = uuid.uuid4().hex[:6]
    vm, peer = f"npt-vm-h{tag}", f"npt-vm-p{tag}"
    try:
        for ns in (vm, peer):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", vm, "link", "add", "eth0", "type", "veth", "peer", "name",
                        "eth0", "netns", peer], check=True)
        for ns, ip in ((vm, VM_IP), (peer, PEER_IP)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        yield f"/run/netns/{vm}", f"/run/netns/{peer}"
    finally:
        for ns in (vm, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def in_ns(path: str, fn):
    fd = os.open(path, os.O_RDONLY)
    try:
        return run_in_netns(fd, fn)
    finally:
        os.close(fd)


def tcp_listener(ip: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(8)
    s.settimeout(5)
    return s


def accept(lst: socket.socket) -> socket.socket:
    conn, _ = lst.accept()
    conn.settimeout(5)  # accepted sockets do not inherit the listener's timeout
    return conn


def connect(ip: str, port: int) -> socket.socket:
    s = socket.create_connection((ip, port), timeout=5)
    s.settimeout(5)
    return s


async def test_host_capture_in_a_vm_netns(pair: tuple[str, str]):
    vm, peer = pair
    closing: list[socket.socket] = []
    try:
        peer_app = in_ns(peer, lambda: tcp_listener(PEER_IP, 9000))
        closing.append(peer_app)
        # a connection the VM had before its capture (think: an SSH session)
        old = in_ns(vm, lambda: connect(PEER_IP, 9000))
        closing.append(old)
        old_far = accept(peer_app)
        closing.append(old_far)

        wanted = rules.host_rules(outbound_exempt=[(PEER_IP, 9001)])
        await netprog.program_host(vm, wanted)
        await netprog.program_host(vm, wanted)  # idempotent
        assert await netprog.is_programmed(vm, host_rule_set=wanted)
        outbound, inbound = (in_ns(vm, lambda p=p: listener(p)) for p in (15001, 15006))
        closing += [outbound, inbound]
        for s in (outbound, inbound):
            s.settimeout(5)  # blocking, but never for ever

        # the old connection goes on, untouched, both ways
        old.sendall(b"ping")
        assert old_far.recv(4) == b"ping"
        old_far.sendall(b"pong")
        assert old.recv(4) == b"pong"

        # a new outbound connection lands on 15001 with its original destination
        new = in_ns(vm, lambda: connect(PEER_IP, 9000))
        closing.append(new)
        got = accept(outbound)
        closing.append(got)
        assert original_dst(got) == (PEER_IP, 9000)

        # the exempt destination (the control plane, in real use) is reached directly
        cp = in_ns(peer, lambda: tcp_listener(PEER_IP, 9001))
        closing.append(cp)
        direct = in_ns(vm, lambda: connect(PEER_IP, 9001))
        closing.append(direct)
        far = accept(cp)
        closing.append(far)

        # inbound to an app port lands on 15006; SSH is not captured
        app_in = in_ns(peer, lambda: connect(VM_IP, 8080))
        closing.append(app_in)
        got_in = accept(inbound)
        closing.append(got_in)
        assert original_dst(got_in) == (VM_IP, 8080)
        ssh = in_ns(vm, lambda: tcp_listener(VM_IP, 22))
        closing.append(ssh)
        ssh_in = in_ns(peer, lambda: connect(VM_IP, 22))
        closing.append(ssh_in)
        ssh_far = accept(ssh)
        closing.append(ssh_far)

        await netprog.unprogram_pod(vm, host_mode=True)
        assert not await netprog.is_programmed(vm, host_rule_set=wanted)
        # without the capture, a new connection reaches the peer's app itself
        after = in_ns(vm, lambda: connect(PEER_IP, 9000))
        closing.append(after)
        far2 = accept(peer_app)
        closing.append(far2)
    finally:
        for s in closing:
            s.close()
