"""A small CNI runtime: runs a network configuration list the way a container runtime does.

The sans-IO part (:class:`RuntimeConf`, :func:`invocation`, :func:`parse_output`) builds each
plugin's environment and stdin and reads its reply; :func:`run_conflist` is the trio driver
that executes the plugins. ADD runs the plugins in order, each given the previous result as
``prevResult``; DEL runs them in reverse with the cached ADD result, best effort.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)

CNI_VERSION = "1.0.0"
LOOPBACK_CONF: dict[str, Any] = {
    "cniVersion": CNI_VERSION, "name": "cni-loopback", "type": "loopback"
}


class CNIError(RuntimeError):
    """A plugin failed; ``code``/``msg``/``details`` are its CNI error object."""

    def __init__(self, plugin: str, code: int, msg: str, details: str = "") -> None:
        self.plugin, self.code, self.msg, self.details = plugin, code, msg, details
        text = f"CNI plugin {plugin} failed (code {code}): {msg}"
        super().__init__(f"{text}: {details}" if details else text)


@dataclass(frozen=True)
class RuntimeConf:
    """What the runtime knows about one pod sandbox."""

    container_id: str
    netns: str  # a path, /run/netns/NAME
    ifname: str = "eth0"
    args: Mapping[str, str] = field(default_factory=dict)  # K8S_POD_NAMESPACE, …
    cni_path: str = "/opt/cni/bin"


@dataclass(frozen=True)
class Invocation:
    plugin: str  # the plugin's type = executable name in CNI_PATH
    env: dict[str, str]
    stdin: bytes


def k8s_args(namespace: str, name: str, uid: str) -> dict[str, str]:
    """CNI_ARGS as kubelet/containerd pass them: ``IgnoreUnknown=1`` first, or the reference
    plugins refuse the K8S_* keys they do not know."""
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": namespace,
        "K8S_POD_NAME": name,
        "K8S_POD_UID": uid,
    }


def validate_conflist(conflist: Mapping[str, Any]) -> None:
    if not isinstance(conflist, Mapping):
        raise CNIError("-", 7, "network configuration list is not an object")
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIError("-", 7, "network configuration list has no plugins")
    for p in plugins:
        if not isinstance(p, Mapping) or not isinstance(p.get("type"), str) or not p["type"]:
            raise CNIError("-", 7, f"plugin entry without a type: {p!r}")
        if "/" in p["type"]:
            raise CNIError(p["type"], 7, "plugin type must not contain '/'")


def plugin_config(
    conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev_result: Any | None
) -> dict[str, Any]:
    """The stdin object for one plugin of a list: its entry + the list's name/cniVersion."""
    conf = dict(plugin)
    conf["cniVersion"] = conflist.get("cniVersion", CNI_VERSION)
    conf["name"] = conflist.get("name", "")
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def invocation(
    command: str,
    conf: Mapping[str, Any],
    rt: RuntimeConf,
    base_env: Mapping[str, str] | None = None,
) -> Invocation:
    """Environment and stdin for running one plugin with ``conf`` (already complete)."""
    if base_env is None:
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env = dict(base_env)
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rt.container_id,
            "CNI_NETNS": rt.netns,
            "CNI_IFNAME": rt.ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in rt.args.items()),
            "CNI_PATH": rt.cni_path,
        }
    )
    return Invocation(str(conf["type"]), env, json.dumps(conf).encode())


def parse_output(plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes) -> Any:
    """The plugin's result (ADD), ``None`` (DEL/CHECK), or :class:`CNIError`."""
    text = stdout.decode("utf-8", "replace").strip()
    if returncode != 0:
        try:
            err = json.loads(text)
        except ValueError:
            err = None
        if isinstance(err, dict) and "code" in err:
            raise CNIError(plugin, int(err.get("code") or 999), str(err.get("msg", "")),
                           str(err.get("details", "")))
        detail = (text or stderr.decode("utf-8", "replace")).strip()[-2000:]
        raise CNIError(plugin, 999, f"exited with status {returncode}", detail)
    if command != "ADD":
        return None
    try:
        result = json.loads(text)
    except ValueError:
        raise CNIError(plugin, 6, "result is not JSON", text[:500]) from None
    if not isinstance(result, dict):
        raise CNIError(plugin, 6, "result is not an object", text[:500])
    return result


def result_ips(result: Mapping[str, Any] | None) -> list[str]:
    """Addresses of the result (without prefix length), for the container's interfaces."""
    if not result:
        return []
    out = []
    for ip in result.get("ips", []) or []:
        addr = str(ip.get("address", "")).split("/")[0]
        if addr:
            out.append(addr)
    return out


# -- driver ------------------------------------------------------------------------------


async def run_plugin(
    inv: Invocation, command: str, wrapper: list[str] | None = None, timeout: float = 30
) -> Any:
    """Run one plugin binary from CNI_PATH; ``wrapper`` prefixes argv (``ip netns exec X``)."""
    exe = None
    for d in inv.env["CNI_PATH"].split(":"):
        cand = os.path.join(d, inv.plugin)
        if os.access(cand, os.X_OK):
            exe = cand
            break
    if exe is None:
        raise CNIError(inv.plugin, 5, f"plugin not found in CNI_PATH {inv.env['CNI_PATH']}")
    argv = [*(wrapper or []), exe]
    with trio.move_on_after(timeout) as scope:
        proc = await trio.run_process(argv, stdin=inv.stdin, capture_stdout=True,
                                      capture_stderr=True, check=False, env=inv.env)
    if scope.cancelled_caught:
        raise CNIError(inv.plugin, 5, f"timed out after {timeout} s")
    if proc.stderr:
        log.debug("%s %s stderr: %s", inv.plugin, command, proc.stderr.decode(errors="replace"))
    return parse_output(inv.plugin, command, proc.returncode, proc.stdout, proc.stderr)


async def run_conflist(
    command: str,
    conflist: Mapping[str, Any],
    rt: RuntimeConf,
    cached_result: Any | None = None,
    wrapper: list[str] | None = None,
) -> Any:
    """ADD: run every plugin in order and return the final result. DEL: reverse order with
    ``cached_result`` as prevResult; every plugin is tried and the first error is raised."""
    validate_conflist(conflist)
    plugins = list(conflist["plugins"])
    if command == "ADD":
        prev = None
        for p in plugins:
            inv = invocation("ADD", plugin_config(conflist, p, prev), rt)
            prev = await run_plugin(inv, "ADD", wrapper)
        return prev
    first: CNIError | None = None
    for p in reversed(plugins):
        inv = invocation(command, plugin_config(conflist, p, cached_result), rt)
        try:
            await run_plugin(inv, command, wrapper)
        except CNIError as e:
            log.warning("CNI %s: %s", command, e)
            first = first or e
    if first is not None:
        raise first
    return None


async def run_single(
    command: str, conf: Mapping[str, Any], rt: RuntimeConf, wrapper: list[str] | None = None
) -> Any:
    """A single (non-list) network configuration, e.g. the loopback."""
    return await run_plugin(invocation(command, dict(conf), rt), command, wrapper)
