"""The ``nodeproxy`` console script: one entry point for every process of the mesh."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "lab": ("nodeproxy.lab.cli", "run a cluster on this machine: up, status, exec, logs, down"),
    "demo": ("nodeproxy.demo", "bring up the demo lab, send traffic, show what happened"),
    "controlplane": ("controlplane.main", "the control plane: discovery and CA on 15012"),
    "ztunnel": ("ztunnel.proxy", "the node proxy (one per node)"),
    "cni-agent": ("cni.agent", "the CNI node agent (one per node)"),
    "gateway": ("l7gateway.gateway", "a namespace's L7 gateway (HTTP routing, retries, policy)"),
    "cni-install": ("cni.install", "install and repair the chained CNI plugin in a node's config"),
    "echo": ("nodeproxy.echo", "the echo app used by tests and the demo"),
}


def usage() -> str:
    lines = ["usage: nodeproxy COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(f"nodeproxy: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
