"""The chained CNI plugin: handle() for every command and bad input, and the real console script."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from cni import plugin
from cni.plugin import SUPPORTED_VERSIONS, handle

SCRIPT = Path("/work/main/.venv/bin/nodeproxy-cni")

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


def conf(**extra: Any) -> bytes:
    body = {
        "cniVersion": "1.0.0",
        "name": "lab",
        "type": "nodeproxy-cni",
        "agentSocket": "/nonexistent/agent.sock",
        "prevResult": PREV,
    }
    body.update(extra)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def env(command: str = "ADD", **extra: str) -> dict[str, str]:
    e = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1",
        "CNI_PATH": "/usr/lib/cni",
    }
    e.update(extra)
    return {k: v for k, v in e.items() if v != ""}


class Agent:
    """Records requests and answers with a fixed reply (or raises, like a missing socket)."""

    def __init__(self, reply: Any = None, error: Exception | None = None) -> None:
        self.reply = {"ok": True} if reply is None else reply
        self.error = error
        self.requests: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(req)
        if self.error is not None:
            raise self.error
        return self.reply


def err(out: bytes) -> dict[str, Any]:
    body = json.loads(out)
    assert set(body) == {"cniVersion", "code", "msg", "details"}
    return body


def unreachable() -> Agent:
    return Agent(error=FileNotFoundError(2, "No such file or directory"))


# -- ADD ---------------------------------------------------------------------------------


def test_add_asks_the_agent_and_passes_prev_result_through() -> None:
    agent = Agent()
    code, out = handle(env(), conf(cniVersion="1.1.0"), agent)
    assert code == 0
    assert json.loads(out) == {**PREV, "cniVersion": "1.1.0"}
    assert agent.requests == [
        {
            "command": "ADD",
            "container_id": "c0ffee",
            "netns": "/var/run/netns/x",
            "ifname": "eth0",
            "pod_namespace": "shop",
            "pod_name": "cart-1",
            "pod_uid": "u-1",
            "ips": ["10.1.0.5"],
        }
    ]


def test_add_without_prev_result_is_invalid_config() -> None:
    agent = Agent()
    code, out = handle(env(), conf(prevResult=None), agent)
    assert code != 0 and err(out)["code"] == 7
    assert agent.requests == []


def test_add_with_agent_unreachable_is_try_again_later() -> None:
    code, out = handle(env(), conf(), unreachable())
    body = err(out)
    assert code != 0 and body["code"] == 11
    assert "No such file" in body["details"]


@pytest.mark.parametrize("reply", [{"ok": "yes"}, ["ok"], {"nope": 1}])
def test_add_with_malformed_agent_reply_fails_closed(reply: Any) -> None:
    code, out = handle(env(), conf(), Agent(reply=reply))
    assert code != 0 and err(out)["code"] == 11


def test_add_refused_by_agent_passes_its_code_and_message() -> None:
    agent = Agent(reply={"ok": False, "code": 11, "msg": "node proxy not connected"})
    code, out = handle(env(), conf(), agent)
    body = err(out)
    assert code != 0 and body["code"] == 11 and body["msg"] == "node proxy not connected"


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
def test_add_missing_env_is_invalid_env(missing: str) -> None:
    e = env()
    del e[missing]
    code, out = handle(e, conf(), Agent())
    assert code != 0 and err(out)["code"] == 4
    assert missing in err(out)["msg"]


def test_add_without_pod_identity_is_invalid_env() -> None:
    code, out = handle(env(CNI_ARGS="IgnoreUnknown=1"), conf(), Agent())
    assert code != 0 and err(out)["code"] == 4


def test_add_with_malformed_cni_args_is_invalid_env() -> None:
    code, out = handle(env(CNI_ARGS="K8S_POD_NAME"), conf(), Agent())
    assert code != 0 and err(out)["code"] == 4


def test_add_with_malformed_prev_result_ips_is_invalid_config() -> None:
    code, out = handle(env(), conf(prevResult={"ips": [{"gateway": "1.2.3.4"}]}), Agent())
    assert code != 0 and err(out)["code"] == 7


def test_unsupported_version_is_incompatible() -> None:
    code, out = handle(env(), conf(cniVersion="9.9.9"), Agent())
    body = err(out)
    assert code != 0 and body["code"] == 1


# -- DEL, CHECK, VERSION, STATUS, GC -------------------------------------------------------


def test_del_is_best_effort_when_the_agent_is_unreachable() -> None:
    agent = unreachable()
    assert handle(env("DEL"), conf(), agent) == (0, b"")
    assert handle(env("DEL", CNI_NETNS=""), conf(), agent) == (0, b"")
    assert [r["command"] for r in agent.requests] == ["DEL", "DEL"]


def test_del_is_idempotent_and_ignores_agent_errors() -> None:
    agent = Agent(reply={"ok": False, "code": 5, "msg": "iptables failed"})
    assert handle(env("DEL"), conf(), agent) == (0, b"")
    assert handle(env("DEL"), conf(), agent) == (0, b"")


def test_del_needs_a_container_id() -> None:
    e = env("DEL")
    del e["CNI_CONTAINERID"]
    code, out = handle(e, conf(), Agent())
    assert code != 0 and err(out)["code"] == 4


def test_check_asks_the_agent() -> None:
    agent = Agent()
    assert handle(env("CHECK"), conf(), agent) == (0, b"")
    assert agent.requests[0]["command"] == "CHECK"
    code, out = handle(env("CHECK"), conf(), Agent(reply={"ok": False, "code": 5, "msg": "gone"}))
    assert code != 0 and err(out)["code"] == 5
    code, out = handle(env("CHECK"), conf(), unreachable())
    assert code != 0 and err(out)["code"] == 11


def test_check_needs_prev_result_and_a_recent_version() -> None:
    code, out = handle(env("CHECK"), conf(prevResult=None), Agent())
    assert code != 0 and err(out)["code"] == 7
    code, out = handle(env("CHECK"), conf(cniVersion="0.3.1"), Agent())
    assert code != 0 and err(out)["code"] == 1


def test_version_lists_supported_versions() -> None:
    code, out = handle({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}', Agent())
    assert code == 0
    assert json.loads(out) == {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}
    code, out = handle({"CNI_COMMAND": "VERSION"}, b"", Agent())
    assert code == 0 and json.loads(out)["supportedVersions"] == SUPPORTED_VERSIONS


def test_status_reports_an_absent_agent() -> None:
    assert handle(env("STATUS"), conf(cniVersion="1.1.0"), Agent()) == (0, b"")
    code, out = handle(env("STATUS"), conf(cniVersion="1.1.0"), unreachable())
    assert code != 0 and err(out)["code"] == 50


def test_gc_succeeds() -> None:
    assert handle(env("GC"), conf(cniVersion="1.1.0"), Agent()) == (0, b"")


def test_unknown_or_missing_command_is_invalid_env() -> None:
    code, out = handle(env("FROB"), conf(), Agent())
    assert code != 0 and err(out)["code"] == 4
    e = env()
    del e["CNI_COMMAND"]
    code, out = handle(e, conf(), Agent())
    assert code != 0 and err(out)["code"] == 4


GARBAGE = [
    b"",
    b"{",
    b"\xff\xfe\x00garbage",
    b"[]",
    b"null",
    b'"string"',
    b'{"cniVersion": 5}',
    b'{"cniVersion": "1.0.0", "prevResult": []}',
    b'{"cniVersion": "1.0.0", "agentSocket": 42}',
    b'{"cniVersion": "1.0.0", "prevResult": {"ips": "10.0.0.1"}}',
    os.urandom(64),
]


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
@pytest.mark.parametrize("stdin", GARBAGE)
def test_garbage_stdin_gives_a_cni_error(command: str, stdin: bytes) -> None:
    agent = Agent()
    code, out = handle(env(command), stdin, agent)
    body = err(out)
    assert code != 0
    assert body["code"] in (1, 4, 6, 7)
    assert agent.requests == []


# -- the real console script ----------------------------------------------------------------


async def fake_agent(path: str, requests: list[dict[str, Any]], reply: dict[str, Any]) -> Any:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            requests.append(json.loads(buf))
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    return sock, serve


async def run_script(e: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    proc = await trio.run_process(
        [str(SCRIPT)],
        stdin=stdin,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **e},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


async def test_console_script_add_against_a_listening_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    log_file = tmp_path / "cni.log"
    requests: list[dict[str, Any]] = []
    sock, serve = await fake_agent(path, requests, {"ok": True})
    with trio.fail_after(20), sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(sock)])
            code, out, stderr = await run_script(
                env(), conf(agentSocket=path, logFile=str(log_file))
            )
            nursery.cancel_scope.cancel()
    assert code == 0, (out, stderr)
    assert json.loads(out) == PREV
    assert requests[0]["pod_name"] == "cart-1" and requests[0]["ips"] == ["10.1.0.5"]
    assert "ADD shop/cart-1 ok" in log_file.read_text()


async def test_console_script_fails_closed_without_an_agent(tmp_path: Path) -> None:
    path = str(tmp_path / f"absent-{uuid.uuid4().hex}.sock")
    with trio.fail_after(20):
        code, out, stderr = await run_script(env(), conf(agentSocket=path))
        assert code != 0 and err(out)["code"] == 11
        code, out, stderr = await run_script(env("DEL"), conf(agentSocket=path))
        assert (code, out) == (0, b"")
        code, out, stderr = await run_script(env(), b"\x00\x01 not json")
        assert code != 0 and err(out)["code"] == 6
        assert b"Traceback" not in stderr
        code, out, stderr = await run_script({"CNI_COMMAND": "VERSION"}, b"")
        assert code == 0 and json.loads(out)["supportedVersions"] == SUPPORTED_VERSIONS


def test_ask_agent_socket_reports_a_closed_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen()
        # the connection is queued in the backlog; closing the listener resets it
        srv.close()
        with pytest.raises(OSError):
            plugin.ask_agent_socket(path, {"command": "ADD"}, timeout=2)
