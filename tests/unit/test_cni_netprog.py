"""Programming a real network namespace: iptables-save and ip rule inside it, idempotent."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from cni import netprog, rules


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"npt-cni-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(path: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={path}", *argv], check=True, capture_output=True, text=True
    ).stdout


def rule_lines(path: str) -> list[str]:
    return [line for line in inside(path, "iptables-save").splitlines() if "ISTIO" in line]


def fwmark_rules(path: str) -> list[str]:
    return [line for line in inside(path, "ip", "rule").splitlines() if "fwmark 0x111" in line]


async def test_program_installs_rules_rule_and_route_once(netns: str) -> None:
    assert not await netprog.is_programmed(netns)
    await netprog.program_pod(netns)
    saved = inside(netns, "iptables-save")
    assert rules.pod_rules_match(saved)
    assert (
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15001" in saved
    )
    assert fwmark_rules(netns) == ["32764:\tfrom all fwmark 0x111/0xfff lookup 100"]
    assert "local default dev lo" in inside(netns, "ip", "route", "show", "table", "100")
    assert await netprog.is_programmed(netns)

    before = rule_lines(netns)
    await netprog.program_pod(netns)  # again: nothing duplicated
    assert rule_lines(netns) == before
    assert len(fwmark_rules(netns)) == 1
    assert await netprog.is_programmed(netns)


async def test_unprogram_removes_everything_and_is_idempotent(netns: str) -> None:
    await netprog.program_pod(netns)
    await netprog.unprogram_pod(netns)
    assert rule_lines(netns) == []
    assert fwmark_rules(netns) == []
    assert inside(netns, "ip", "route", "show", "table", "100").strip() == ""
    assert not await netprog.is_programmed(netns)
    await netprog.unprogram_pod(netns)  # again: fine
    assert rule_lines(netns) == []


async def test_program_repairs_a_half_programmed_netns(netns: str) -> None:
    # someone removed one of our rules: program_pod restores exactly the full set
    await netprog.program_pod(netns)
    inside(
        netns,
        "iptables",
        "-t",
        "nat",
        "-D",
        "ISTIO_OUTPUT",
        "-o",
        "lo",
        "!",
        "-d",
        "127.0.0.1/32",
        "-j",
        "ACCEPT",
    )
    assert not await netprog.is_programmed(netns)
    await netprog.program_pod(netns)
    assert await netprog.is_programmed(netns)
    assert rules.pod_rules_match(inside(netns, "iptables-save"))


async def test_unprogram_of_a_missing_netns_is_not_an_error() -> None:
    await netprog.unprogram_pod("/var/run/netns/npt-cni-does-not-exist")
    await netprog.unprogram_pod("")
    assert not await netprog.is_programmed("/var/run/netns/npt-cni-does-not-exist")


async def test_program_refuses_the_host_namespace_and_non_namespaces(tmp_path) -> None:
    with pytest.raises(netprog.NetprogError, match="host network namespace"):
        await netprog.program_pod("/proc/self/ns/net")
    with pytest.raises(netprog.NetprogError, match="host network namespace"):
        await netprog.unprogram_pod("/proc/self/ns/net")
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(netprog.NetprogError, match="not a network namespace"):
        await netprog.program_pod(str(plain))
