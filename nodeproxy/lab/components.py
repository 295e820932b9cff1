"""Command lines of the mesh components the lab runs, and the files they are handed.

Kept apart from the supervisor so that what runs where is plain data: a lab with
``spec.mesh: false`` gets no components and a conflist without the project's plugin.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from nodeproxy.lab.paths import LabPaths
from nodeproxy.lab.spec import (
    CONTROLPLANE_ADMIN_PORT,
    CONTROLPLANE_PORT,
    UNDERLAY_GATEWAY,
    LabSpec,
    node_netns,
    underlay_netns,
    vm_netns,
)


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # also the log's name: logs/<name>.log
    netns: str
    argv: list[str]
    node: str | None = None  # None: the underlay (control plane)


def nodeproxy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodeproxy.cli", *args]


def controlplane_address() -> str:
    return f"{UNDERLAY_GATEWAY}:{CONTROLPLANE_PORT}"


def component_specs(spec: LabSpec, paths: LabPaths) -> list[ComponentSpec]:
    """Control plane first, then per node its CNI agent and node proxy, then per VM its node
    proxy in host mode; none without mesh."""
    if not spec.mesh:
        return []
    cp = controlplane_address()
    out = [
        ComponentSpec(
            "controlplane",
            underlay_netns(paths.prefix),
            nodeproxy_cmd(
                "controlplane",
                "--resources", str(paths.resources),
                "--state-dir", str(paths.controlplane_state),
                "--tokens", str(paths.tokens),
                "--listen", cp,
                "--admin", f"{UNDERLAY_GATEWAY}:{CONTROLPLANE_ADMIN_PORT}",
                *(["--cert-ttl", str(spec.certificate_ttl)] if spec.certificate_ttl else []),
            ),
        )
    ]
    for n in spec.nodes:
        ns = node_netns(paths.prefix, n.name)
        common = [
            "--node", n.name,
            "--controlplane", cp,
            "--ca-root", str(paths.ca_root),
            "--token-file", str(paths.token_file(n.name)),
        ]
        out.append(
            ComponentSpec(
                f"cni-agent-{n.name}",
                ns,
                nodeproxy_cmd(
                    "cni-agent", *common,
                    "--plugin-socket", str(paths.plugin_socket(n.name)),
                    "--ztunnel-socket", str(paths.ztunnel_socket(n.name)),
                    "--state-dir", str(paths.agent_state(n.name)),
                ),
                n.name,
            )
        )
        out.append(
            ComponentSpec(
                f"ztunnel-{n.name}",
                ns,
                nodeproxy_cmd(
                    "ztunnel", *common,
                    "--agent-socket", str(paths.ztunnel_socket(n.name)),
                    # drain within the supervisor's stop grace (5 s) before it kills
                    "--drain-seconds", "3",
                    *(["--workers", str(n.workers)] if n.workers > 1 else []),
                ),
                n.name,
            )
        )
    for vm in spec.vms:
        out.append(
            ComponentSpec(
                vm_component(vm.name),
                vm_netns(paths.prefix, vm.name),
                nodeproxy_cmd(
                    "ztunnel", "--host-mode",
                    "--workload", f"{vm.namespace}/{vm.name}",
                    "--node", vm.name,
                    "--controlplane", cp,
                    "--ca-root", str(paths.ca_root),
                    "--token-file", str(paths.vm_token_file(vm.name)),
                    "--drain-seconds", "3",
                ),
                vm.name,
            )
        )
    return out


def vm_component(vm: str) -> str:
    """The name of a VM's node proxy (host mode) among the lab's components."""
    return f"ztunnel-vm-{vm}"


def conflist(spec: LabSpec, paths: LabPaths, node: str) -> dict[str, Any]:
    """The node's CNI network configuration list (the project's plugin chained when meshed)."""
    n = spec.node(node)
    assert n is not None
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": n.pod_cidr}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(paths.ipam(node)),
            },
        }
    ]
    if spec.mesh:
        plugins.append(
            {
                "type": "nodeproxy-cni",
                "agentSocket": str(paths.plugin_socket(node)),
                "logFile": str(paths.log(f"cni-plugin-{node}")),
            }
        )
    return {"cniVersion": "1.0.0", "name": "nodeproxy-lab", "plugins": plugins}
