"""The chained CNI plugin ``nodeproxy-cni``.

It runs after the pod's network is set up (``prevResult`` holds the pod's IPs) and asks the
node agent to enrol the pod; the agent decides whether the pod is meshed. :func:`handle` is the
whole CNI logic without IO; :func:`main` reads the environment and stdin, talks to the agent
over its Unix stream socket (one JSON line each way) and prints the result.

Fail closed: if the agent cannot be reached on ADD, the plugin answers code 11 ("try again
later") so the runtime never starts a pod that should have been captured without its capture.
DEL is best-effort and idempotent: it always succeeds once the input is well-formed.

Only the standard library is imported here: the runtime starts this process for every pod.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_VERSION = "1.0.0"
DEFAULT_AGENT_SOCKET = "/var/run/nodeproxy/cni-plugin.sock"
AGENT_TIMEOUT = 15.0
MAX_STDIN = 1 << 20
MAX_REPLY = 64 * 1024

# CNI error codes (spec 1.0.0/1.1.0)
INCOMPATIBLE_VERSION = 1
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
INTERNAL = 999

AskAgent = Callable[[dict[str, Any]], dict[str, Any]]


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _error(version: str, err: CniError) -> tuple[int, bytes]:
    body = {"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details}
    return 1, (json.dumps(body) + "\n").encode()


def _version_of(conf: Any) -> str:
    if isinstance(conf, dict) and conf.get("cniVersion") in SUPPORTED_VERSIONS:
        return str(conf["cniVersion"])
    return DEFAULT_VERSION


def parse_config(stdin: bytes) -> dict[str, Any]:
    """Decode and validate the network configuration (raises :class:`CniError`)."""
    try:
        conf = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, "cannot decode the network configuration", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration is not a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(INVALID_CONFIG, "cniVersion is missing or not a string")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    for key in ("name", "type"):
        if key in conf and not isinstance(conf[key], str):
            raise CniError(INVALID_CONFIG, f"{key} must be a string")
    sock = conf.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(sock, str) or not sock:
        raise CniError(INVALID_CONFIG, "agentSocket must be a non-empty string")
    prev = conf.get("prevResult")
    if prev is not None:
        if not isinstance(prev, dict):
            raise CniError(INVALID_CONFIG, "prevResult must be an object")
        prev_ips(prev)  # validates its addresses
    log_file = conf.get("logFile")
    if log_file is not None and not isinstance(log_file, str):
        raise CniError(INVALID_CONFIG, "logFile must be a string")
    return conf


def parse_cni_args(value: str) -> dict[str, str]:
    """``K=V;K=V`` → dict (malformed parts raise :class:`CniError`)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"malformed CNI_ARGS entry {part!r}")
        out[key] = val
    return out


def prev_ips(prev: dict[str, Any]) -> list[str]:
    """The pod's addresses from ``prevResult.ips[].address`` (prefix length dropped)."""
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise CniError(INVALID_CONFIG, "prevResult.ips must be a list")
    out = []
    for entry in ips:
        addr = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(addr, str) or not addr:
            raise CniError(INVALID_CONFIG, f"prevResult.ips entry without address: {entry!r}")
        out.append(addr.split("/", 1)[0])
    return out


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniError(INVALID_ENV, f"{name} is required")
    return value


def _request(command: str, env: Mapping[str, str], ips: list[str]) -> dict[str, Any]:
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return {
        "command": command,
        "container_id": env.get("CNI_CONTAINERID", ""),
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "pod_namespace": args.get("K8S_POD_NAMESPACE", ""),
        "pod_name": args.get("K8S_POD_NAME", ""),
        "pod_uid": args.get("K8S_POD_UID", ""),
        "ips": ips,
    }


def _ask(ask_agent: AskAgent, request: dict[str, Any], unreachable_code: int) -> dict[str, Any]:
    try:
        reply = ask_agent(request)
    except Exception as e:  # any failure to get an answer means "not now"
        raise CniError(unreachable_code, "node agent unreachable", str(e)) from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CniError(unreachable_code, "node agent sent a malformed reply", repr(reply)[:200])
    return reply


def _check_reply(reply: dict[str, Any]) -> None:
    if reply["ok"]:
        return
    code = reply.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code <= 0:
        code = TRY_AGAIN_LATER
    raise CniError(code, str(reply.get("msg") or "node agent refused"))


def handle(env: Mapping[str, str], stdin: bytes, ask_agent: AskAgent) -> tuple[int, bytes]:
    """Run one CNI command; returns (exit code, stdout). Never raises."""
    try:
        return _handle(env, stdin, ask_agent)
    except CniError as e:
        conf: Any = None
        try:
            conf = json.loads(stdin)
        except Exception:
            conf = None
        log.warning(
            "CNI %s failed: code %d: %s %s", env.get("CNI_COMMAND"), e.code, e.msg, e.details
        )
        return _error(_version_of(conf), e)
    except Exception as e:  # a bug must still answer in CNI form, and fail closed
        log.exception("CNI plugin internal error")
        return _error(DEFAULT_VERSION, CniError(INTERNAL, "internal error", repr(e)))


def _handle(env: Mapping[str, str], stdin: bytes, ask_agent: AskAgent) -> tuple[int, bytes]:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is required")
    if command == "VERSION":
        version = "1.1.0"
        if stdin.strip():
            version = _version_of(parse_config(stdin))
        out = {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
        return 0, (json.dumps(out) + "\n").encode()
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
    conf = parse_config(stdin)
    version = conf["cniVersion"]

    if command == "ADD":
        _require(env, "CNI_CONTAINERID")
        _require(env, "CNI_NETNS")
        _require(env, "CNI_IFNAME")
        prev = conf.get("prevResult")
        if prev is None:
            raise CniError(INVALID_CONFIG, "nodeproxy-cni must be chained: prevResult missing")
        request = _request("ADD", env, prev_ips(prev))
        if not request["pod_namespace"] or not request["pod_name"]:
            raise CniError(INVALID_ENV, "CNI_ARGS needs K8S_POD_NAMESPACE and K8S_POD_NAME")
        _check_reply(_ask(ask_agent, request, TRY_AGAIN_LATER))
        result = dict(prev)
        result["cniVersion"] = version
        log.info("ADD %s/%s ok", request["pod_namespace"], request["pod_name"])
        return 0, (json.dumps(result) + "\n").encode()

    if command == "DEL":
        _require(env, "CNI_CONTAINERID")
        request = _request("DEL", env, [])
        try:
            _check_reply(_ask(ask_agent, request, TRY_AGAIN_LATER))
        except CniError as e:
            # best-effort: the sandbox is going away whatever we answer; the agent forgets
            # the pod on its next DEL or when it finds the netns gone
            log.warning("DEL %s: %s %s (ignored)", request["container_id"], e.msg, e.details)
        return 0, b""

    if command == "CHECK":
        if version in ("0.3.0", "0.3.1"):
            raise CniError(INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later")
        _require(env, "CNI_CONTAINERID")
        _require(env, "CNI_NETNS")
        prev = conf.get("prevResult")
        if prev is None:
            raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
        request = _request("CHECK", env, prev_ips(prev))
        _check_reply(_ask(ask_agent, request, TRY_AGAIN_LATER))
        return 0, b""

    if command == "STATUS":
        _check_reply(_ask(ask_agent, {"command": "STATUS"}, PLUGIN_NOT_AVAILABLE))
        return 0, b""

    # GC: the agent forgets sandboxes on DEL and drops pods whose netns is gone; there is
    # nothing the plugin itself holds.
    return 0, b""


def ask_agent_socket(path: str, request: dict[str, Any], timeout: float = AGENT_TIMEOUT) -> dict:
    """One request line to the agent's Unix stream socket, one reply line back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise ValueError("reply too long")
    if not buf.strip():
        raise ConnectionError("node agent closed the connection without a reply")
    return json.loads(buf.split(b"\n", 1)[0])


def _setup_logging(stdin: bytes) -> None:
    try:
        conf = json.loads(stdin)
        log_file = conf.get("logFile") if isinstance(conf, dict) else None
    except Exception:
        log_file = None
    if isinstance(log_file, str) and log_file:
        try:
            handler: logging.Handler = logging.FileHandler(log_file)
        except OSError:
            handler = logging.NullHandler()
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s nodeproxy-cni[{os.getpid()}] %(levelname)s %(message)s")
        )
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        # stdout is the result channel: nothing else may write there
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def _agent_socket(stdin: bytes) -> str:
    try:
        conf = json.loads(stdin)
        path = conf.get("agentSocket") if isinstance(conf, dict) else None
    except Exception:
        path = None
    return path if isinstance(path, str) and path else DEFAULT_AGENT_SOCKET


def main() -> int:
    try:
        stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
    except Exception:
        stdin = b""
    code, out = 1, b""
    try:
        _setup_logging(stdin)
        if len(stdin) > MAX_STDIN:
            code, out = _error(DEFAULT_VERSION, CniError(DECODE_FAILURE, "configuration too big"))
        else:
            path = _agent_socket(stdin)
            code, out = handle(os.environ, stdin, lambda req: ask_agent_socket(path, req))
    except Exception as e:
        code, out = _error(DEFAULT_VERSION, CniError(INTERNAL, "internal error", repr(e)))
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
