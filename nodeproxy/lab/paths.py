"""Where a lab keeps its files, and the names of its network namespaces."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LAB_DIR = "/run/nodeproxy-lab"
DEFAULT_PREFIX = "npl-"
CNI_PLUGINS_DIR = Path("/usr/lib/cni")
CNI_CONFLIST = "10-nodeproxy-lab.conflist"


def venv_bin() -> Path:
    """The directory of this interpreter's console scripts (nodeproxy, nodeproxy-cni)."""
    return Path(sys.executable).parent


@dataclass(frozen=True)
class LabPaths:
    root: Path
    prefix: str

    @classmethod
    def from_env(cls) -> LabPaths:
        root = os.environ.get("NODEPROXY_LAB_DIR") or DEFAULT_LAB_DIR
        prefix = os.environ.get("NODEPROXY_LAB_PREFIX") or DEFAULT_PREFIX
        return cls(Path(root), prefix)

    # -- the lab's own bookkeeping --------------------------------------------------------
    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def pidfile(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def lab_file(self) -> Path:
        return self.root / "lab.yaml"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def capture_file(self) -> Path:
        return self.root / "capture.pcap"

    # -- what the components see ----------------------------------------------------------
    @property
    def resources(self) -> Path:
        return self.root / "resources"

    @property
    def controlplane_state(self) -> Path:
        return self.root / "controlplane"

    @property
    def ca_root(self) -> Path:
        return self.controlplane_state / "ca" / "root.pem"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.yaml"

    @property
    def cni_bin(self) -> Path:
        return self.root / "cni-bin"

    @property
    def cni_cache(self) -> Path:
        return self.root / "cni-cache"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def net_d(self, node: str) -> Path:
        return self.node_dir(node) / "net.d"

    def conflist(self, node: str) -> Path:
        return self.net_d(node) / CNI_CONFLIST

    def token_file(self, node: str) -> Path:
        return self.node_dir(node) / "token"

    def vm_token_file(self, vm: str) -> Path:
        return self.root / "vms" / vm / "token"

    def plugin_socket(self, node: str) -> Path:
        return self.node_dir(node) / "plugin.sock"

    def ztunnel_socket(self, node: str) -> Path:
        return self.node_dir(node) / "ztunnel.sock"

    def agent_state(self, node: str) -> Path:
        return self.node_dir(node) / "agent"

    def ipam(self, node: str) -> Path:
        return self.root / "ipam" / node
