"""The lab supervisor: a detached process that builds the lab and owns everything in it.

``nodeproxy lab up`` starts ``python -m nodeproxy.lab.supervisor LABDIR`` in its own session
and returns once the lab runs. The supervisor plays kubelet and API server: it creates the
namespaces, runs the CNI plugins for every pod, writes the resources the control plane
watches, starts the mesh components and the pods' commands, and programs the kube-proxy
rules. It restarts nothing silently (exits are recorded), answers the CLI on a Unix socket
(one JSON request, one JSON reply per connection) and on SIGTERM tears everything down.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from nodeproxy import netns as netns_mod
from nodeproxy.lab import cniruntime, network
from nodeproxy.lab.components import (
    ComponentSpec,
    component_specs,
    conflist,
    controlplane_address,
    vm_component,
)
from nodeproxy.lab.paths import CNI_PLUGINS_DIR, LabPaths, venv_bin
from nodeproxy.lab.spec import (
    BRIDGE,
    READY_PORT,
    UNDERLAY_GATEWAY,
    VM,
    LabSpec,
    LabSpecError,
    Pod,
    Service,
    assign_cluster_ips,
    check_pods_placed,
    hosts_file,
    kube_proxy_rules,
    load_documents,
    namespace_resource,
    node_netns,
    parse_lab,
    parse_pod,
    parse_resources,
    pod_netns,
    pod_resource,
    resolv_conf,
    resource_filename,
    service_resource,
    underlay_netns,
    vm_netns,
    workload_entry_resource,
)
from nodeproxy.model import (
    DATAPLANE_LABEL,
    GATEWAY_LABEL,
    GATEWAY_POD_LABEL,
    GATEWAY_SERVICE_ACCOUNT,
)

log = logging.getLogger(__name__)

COMPONENT_START_TIMEOUT = 60.0
STOP_GRACE = 5.0
# plugins of the reference set whose errors are not worth retrying
_PLAIN_PLUGINS = {"bridge", "host-local", "loopback"}
CNI_RETRY_FOR = 20.0
MAX_REQUEST = 4 * 1024 * 1024


class LabError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 15) -> str:
    """The end of a log, for error messages: `lab up` removes the lab dir when it fails."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


# -- supervised processes ----------------------------------------------------------------


@dataclass
class Proc:
    """A process the supervisor started: a mesh component, a pod's command, tcpdump."""

    name: str
    argv: list[str]
    netns: str
    log_path: Path
    env: dict[str, str] | None = None
    process: trio.Process | None = None
    state: str = "stopped"  # stopped | running | exited
    exit_code: int | None = None
    starts: int = 0
    stopping: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.process.pid if self.process and self.state == "running" else None,
            "exit_code": self.exit_code,
            "starts": self.starts,
        }

    async def start(self, nursery: trio.Nursery, on_exit: Any = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- {time.strftime('%F %T')} starting {' '.join(self.argv)}\n".encode())
            logf.flush()
            self.process = await trio.lowlevel.open_process(
                network.netns_exec(self.netns, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=self.env,
                start_new_session=True,
            )
        self.state, self.exit_code, self.stopping = "running", None, False
        self.starts += 1
        nursery.start_soon(self._wait, self.process, on_exit)

    async def _wait(self, process: trio.Process, on_exit: Any) -> None:
        code = await process.wait()
        if process is not self.process:
            return
        self.state, self.exit_code = "exited", code
        if not self.stopping:
            log.warning("%s exited with status %s (not restarted)", self.name, code)
        if on_exit is not None:
            on_exit()

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        p = self.process
        if p is None or p.returncode is not None:
            return
        self.stopping = True
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        with trio.move_on_after(STOP_GRACE):
            await p.wait()
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await p.wait()


@dataclass
class PodState:
    pod: Pod
    uid: str
    netns: str
    node: str
    state: str = "pending"  # pending | networking | running | exited | failed | deleting
    ip: str | None = None
    cni_result: Any = None
    meshed_add: bool = False  # the chain with the project's plugin succeeded
    proc: Proc | None = None
    error: str | None = None


# -- the supervisor ----------------------------------------------------------------------


class Supervisor:
    def __init__(self, paths: LabPaths, spec: LabSpec) -> None:
        self.paths = paths
        self.spec = spec
        self.res = spec.resources
        self.components: dict[str, Proc] = {}
        self.pods: dict[str, PodState] = {}
        self.capture: Proc | None = None
        self.vm_procs: dict[str, Proc] = {}  # VM name → its app
        self.phase = "starting"
        self.step = ""
        self.error: str | None = None
        self.lock = trio.Lock()
        self.nursery: trio.Nursery | None = None
        self._created_ns: list[str] = []
        self._made_etc: set[str] = set()
        self.node_tokens: dict[str, str] = {}
        self.gateway_tokens: dict[str, str] = {}  # namespace → token

    # -- status -------------------------------------------------------------------------
    def ambient(self, namespace: str) -> bool:
        doc = self.res.namespaces.get(namespace) or {}
        labels = (doc.get("metadata") or {}).get("labels") or {}
        return labels.get(DATAPLANE_LABEL) == "ambient"

    def wants_mesh(self, ps: PodState) -> bool:
        return (
            self.spec.mesh
            and self.ambient(ps.pod.namespace)
            and ps.pod.labels.get(DATAPLANE_LABEL) != "none"
        )

    def status(self) -> dict[str, Any]:
        nodes = []
        for n in self.spec.nodes:
            nodes.append(
                {
                    "name": n.name,
                    "netns": node_netns(self.paths.prefix, n.name),
                    "underlay_ip": n.underlay_ip,
                    "pod_cidr": n.pod_cidr,
                    "components": {
                        c: p.to_json()
                        for c, p in self.components.items()
                        if c in (f"cni-agent-{n.name}", f"ztunnel-{n.name}")
                    },
                }
            )
        pods = []
        for ps in sorted(self.pods.values(), key=lambda p: p.pod.key):
            pods.append(
                {
                    "namespace": ps.pod.namespace,
                    "name": ps.pod.name,
                    "uid": ps.uid,
                    "netns": ps.netns,
                    "ip": ps.ip,
                    "node": ps.node,
                    "state": ps.state,
                    "exit_code": ps.proc.exit_code if ps.proc else None,
                    "meshed": bool(ps.meshed_add and self.wants_mesh(ps)),
                    "error": ps.error,
                }
            )
        return {
            "phase": self.phase,
            "step": self.step,
            "error": self.error,
            "lab_dir": str(self.paths.root),
            "prefix": self.paths.prefix,
            "mesh": self.spec.mesh,
            "supervisor_pid": os.getpid(),
            "underlay": {
                "netns": underlay_netns(self.paths.prefix),
                "ip": UNDERLAY_GATEWAY,
                "bridge": BRIDGE,
                "components": {
                    c: p.to_json() for c, p in self.components.items() if c == "controlplane"
                },
            },
            "nodes": nodes,
            "pods": pods,
            "vms": [self.vm_status(vm) for vm in self.spec.vms],
            "services": [
                {"namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
                 "ports": [p.port for p in s.ports]}
                for s in sorted(self.res.services.values(), key=lambda s: s.key)
            ],
            "capture": self.capture.to_json() if self.capture else None,
        }

    def vm_status(self, vm: VM) -> dict[str, Any]:
        comp = self.components.get(vm_component(vm.name))
        app = self.vm_procs.get(vm.name)
        return {
            "name": vm.name,
            "namespace": vm.namespace,
            "service_account": vm.service_account,
            "labels": vm.labels,
            "netns": vm_netns(self.paths.prefix, vm.name),
            "ip": vm.underlay_ip,
            "components": {vm_component(vm.name): comp.to_json()} if comp else {},
            "app": app.to_json() if app else None,
        }

    def save_status(self) -> None:
        try:
            tmp = self.paths.status_file.with_name(".status.json.tmp")
            tmp.write_text(json.dumps(self.status(), indent=1))
            tmp.replace(self.paths.status_file)
        except OSError as e:
            log.debug("status not saved: %s", e)

    def set_step(self, step: str) -> None:
        log.info("%s", step)
        self.step = step
        self.save_status()

    # -- resources (the API server role) ------------------------------------------------
    def write_resource(self, doc: dict[str, Any]) -> None:
        meta = doc.get("metadata") or {}
        name = resource_filename(doc["kind"], meta.get("namespace", ""), meta["name"])
        self.paths.resources.mkdir(parents=True, exist_ok=True)
        # rename into place: the control plane must never read half a file
        tmp = self.paths.resources / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.paths.resources / name)

    def remove_resource(self, kind: str, namespace: str, name: str) -> None:
        (self.paths.resources / resource_filename(kind, namespace, name)).unlink(missing_ok=True)

    def ensure_namespaces(self) -> None:
        """Pods and services may name a namespace the file does not declare: add it."""
        wanted = {p.namespace for p in self.res.pods.values()}
        wanted |= {s.namespace for s in self.res.services.values()}
        wanted |= {vm.namespace for vm in self.spec.vms}
        for ns in sorted(wanted - set(self.res.namespaces)):
            self.res.namespaces[ns] = namespace_resource(ns)

    def write_all_resources(self) -> None:
        self.ensure_namespaces()
        for doc in self.res.namespaces.values():
            self.write_resource(doc)
        for svc in self.res.services.values():
            self.write_resource(service_resource(svc))
        for doc in self.res.others.values():
            self.write_resource(doc)
        for ps in self.pods.values():
            self.write_resource(pod_resource(ps.pod, ps.uid))
        for vm in self.spec.vms:
            self.write_resource(workload_entry_resource(vm))

    # -- bring-up -----------------------------------------------------------------------
    def prepare_files(self) -> None:
        p = self.paths
        for d in (p.logs, p.resources, p.controlplane_state, p.cni_bin, p.cni_cache):
            d.mkdir(parents=True, exist_ok=True)
        for plugin in ("bridge", "host-local", "loopback"):
            src = CNI_PLUGINS_DIR / plugin
            if not os.access(src, os.X_OK):
                raise LabError(
                    f"CNI plugin {src} not found (apt install containernetworking-plugins)"
                )
            (p.cni_bin / plugin).unlink(missing_ok=True)
            (p.cni_bin / plugin).symlink_to(src)
        if self.spec.mesh:
            src = venv_bin() / "nodeproxy-cni"
            if not os.access(src, os.X_OK):
                raise LabError(f"{src} not found: install the project (pip install -e .)")
            (p.cni_bin / "nodeproxy-cni").unlink(missing_ok=True)
            (p.cni_bin / "nodeproxy-cni").symlink_to(src)
        tokens = {}
        for n in self.spec.nodes:
            nd = p.node_dir(n.name)
            p.net_d(n.name).mkdir(parents=True, exist_ok=True)
            p.agent_state(n.name).mkdir(parents=True, exist_ok=True)
            p.ipam(n.name).mkdir(parents=True, exist_ok=True)
            p.conflist(n.name).write_text(json.dumps(conflist(self.spec, p, n.name), indent=2))
            token = secrets.token_urlsafe(32)
            tokens[token] = n.name
            tf = p.token_file(n.name)
            tf.write_text(token + "\n")
            tf.chmod(0o600)
            nd.chmod(0o700)
        for vm in self.spec.vms:
            # a VM's node proxy authenticates as node <VM name>: the WorkloadEntry's node
            token = secrets.token_urlsafe(32)
            tokens[token] = vm.name
            tf = p.vm_token_file(vm.name)
            tf.parent.mkdir(parents=True, exist_ok=True)
            tf.write_text(token + "\n")
            tf.chmod(0o600)
            tf.parent.chmod(0o700)
        self.node_tokens = tokens
        self.write_tokens()

    def write_tokens(self) -> None:
        """Node tokens (value: node name) and gateway tokens (value: ``gateway:NS``)."""
        tokens = dict(self.node_tokens)
        tokens.update({t: f"gateway:{ns}" for ns, t in self.gateway_tokens.items()})
        tmp = self.paths.tokens.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(tokens))
        tmp.chmod(0o600)
        tmp.replace(self.paths.tokens)

    # -- L7 gateways (the control plane's "declare a gateway" played by the lab) ---------
    def gateway_wanted(self, namespace: str) -> bool:
        doc = self.res.namespaces.get(namespace) or {}
        labels = (doc.get("metadata") or {}).get("labels") or {}
        return self.spec.mesh and labels.get(GATEWAY_LABEL) == "enabled"

    def gateway_pod(self, namespace: str) -> Pod:
        token_file = self.paths.root / "gateways" / namespace / "token"
        node = self.spec.nodes[sum(map(ord, namespace)) % len(self.spec.nodes)].name
        doc = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": GATEWAY_SERVICE_ACCOUNT,
                "namespace": namespace,
                "labels": {
                    "app": GATEWAY_SERVICE_ACCOUNT,
                    GATEWAY_POD_LABEL: namespace,
                    # the gateway terminates HBONE itself: its pod is not captured
                    DATAPLANE_LABEL: "none",
                },
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": GATEWAY_SERVICE_ACCOUNT,
                "containers": [{
                    "name": "gateway",
                    "command": [
                        "nodeproxy", "gateway", "--namespace", namespace,
                        "--controlplane", controlplane_address(),
                        "--ca-root", str(self.paths.ca_root),
                        "--token-file", str(token_file),
                    ],
                }],
            },
        }
        return parse_pod(doc, f"gateway of namespace {namespace}")

    async def reconcile_gateways(self) -> list[str]:
        """Start a gateway pod for every labelled namespace, stop the ones no longer wanted."""
        changed = []
        for ns in sorted(self.res.namespaces):
            key = f"{ns}/{GATEWAY_SERVICE_ACCOUNT}"
            running = key in self.pods
            if self.gateway_wanted(ns) and not running:
                token_file = self.paths.root / "gateways" / ns / "token"
                token_file.parent.mkdir(parents=True, exist_ok=True)
                token = secrets.token_urlsafe(32)
                token_file.write_text(token + "\n")
                token_file.chmod(0o600)
                self.gateway_tokens[ns] = token
                self.write_tokens()
                pod = self.gateway_pod(ns)
                self.res.pods[key] = pod
                ps = self.new_pod_state(pod)
                self.write_resource(pod_resource(pod, ps.uid))
                await self.start_pod(ps)
                changed.append(f"gateway/{ns}")
            elif running and not self.gateway_wanted(ns):
                ps = self.pods.pop(key)
                await self.stop_pod(ps)
                self.res.pods.pop(key, None)
                self.remove_resource("Pod", ns, GATEWAY_SERVICE_ACCOUNT)
                self.gateway_tokens.pop(ns, None)
                self.write_tokens()
                changed.append(f"gateway/{ns} removed")
        return changed

    async def build_network(self) -> None:
        prefix = self.paths.prefix
        self._created_ns.append(underlay_netns(prefix))
        await trio.to_thread.run_sync(network.create_underlay, prefix)
        for n in self.spec.nodes:
            self._created_ns.append(node_netns(prefix, n.name))
            await trio.to_thread.run_sync(network.create_node, prefix, n, self.spec.nodes)
        for vm in self.spec.vms:
            self._created_ns.append(vm_netns(prefix, vm.name))
            await trio.to_thread.run_sync(network.create_vm, prefix, vm, self.spec.nodes)
            ns = vm_netns(prefix, vm.name)
            self._made_etc.add(ns)
            network.write_etc(ns, self.vm_hosts(vm), resolv_conf(vm.namespace))

    def component_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{venv_bin()}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def start_component(self, c: ComponentSpec) -> Proc:
        assert self.nursery is not None
        proc = Proc(c.name, c.argv, c.netns, self.paths.log(c.name), self.component_env())
        self.components[c.name] = proc
        await proc.start(self.nursery, self.save_status)
        return proc

    async def wait_for(self, what: str, proc: Proc, check: Any, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while True:
                if proc.state != "running":
                    raise LabError(
                        f"{proc.name} exited with status {proc.exit_code} while waiting for "
                        f"{what}; last lines of its log:\n{log_tail(proc.log_path)}"
                    )
                if await check():
                    return
                await trio.sleep(0.2)
        raise LabError(
            f"{what} not ready after {timeout:.0f} s; last lines of {proc.name}'s log:\n"
            f"{log_tail(proc.log_path)}"
        )

    async def node_ready(self, node: str, ip: str) -> bool:
        return await self.ready_in(node_netns(self.paths.prefix, node), ip)

    async def ready_in(self, netns: str, ip: str) -> bool:
        """Whether the node proxy answers ready on ip:15021, asked from inside ``netns``."""

        def probe() -> bool:
            conn = http.client.HTTPConnection(ip, READY_PORT, timeout=1)
            try:
                conn.request("GET", "/healthz/ready")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()

        fd = os.open(network.NETNS_DIR / netns, os.O_RDONLY)
        try:
            return await netns_mod.in_netns(fd, probe)
        finally:
            os.close(fd)

    async def start_mesh(self) -> None:
        specs = component_specs(self.spec, self.paths)
        if not specs:
            return
        self.set_step("starting the control plane")
        cp = await self.start_component(specs[0])

        async def root_exists() -> bool:
            return self.paths.ca_root.exists()

        await self.wait_for("the control plane's root CA", cp, root_exists,
                            COMPONENT_START_TIMEOUT)
        self.set_step("starting CNI agents and node proxies")
        for c in specs[1:]:
            await self.start_component(c)
        for n in self.spec.nodes:
            agent = self.components[f"cni-agent-{n.name}"]
            sock = self.paths.plugin_socket(n.name)

            async def sock_exists(sock: Path = sock) -> bool:
                return sock.exists()

            await self.wait_for(f"the CNI agent socket {sock}", agent, sock_exists,
                                COMPONENT_START_TIMEOUT)
            zt = self.components[f"ztunnel-{n.name}"]

            async def ready(n: Any = n) -> bool:
                return await self.node_ready(n.name, n.underlay_ip)

            await self.wait_for(f"node proxy readiness on {n.name}", zt, ready,
                                COMPONENT_START_TIMEOUT)
        for vm in self.spec.vms:
            vzt = self.components[vm_component(vm.name)]

            async def vm_ready(vm: VM = vm) -> bool:
                return await self.ready_in(vm_netns(self.paths.prefix, vm.name), vm.underlay_ip)

            await self.wait_for(f"host-mode node proxy readiness on VM {vm.name}", vzt,
                                vm_ready, COMPONENT_START_TIMEOUT)

    async def bring_up(self) -> None:
        try:
            self.set_step("preparing files")
            self.prepare_files()
            for pod in self.res.pods.values():
                self.new_pod_state(pod)
            self.set_step("writing resources")
            self.write_all_resources()
            self.set_step("creating the underlay and nodes")
            await self.build_network()
            await self.start_mesh()
            self.set_step("programming service rules")
            await self.refresh_services()
            self.set_step("starting pods")
            for ps in list(self.pods.values()):
                await self.start_pod(ps)
            for vm in self.spec.vms:
                await self.start_vm_app(vm)
            await self.reconcile_gateways()
            await self.refresh_services()
            self.phase = "running"
            self.set_step("running")
        except (LabError, network.NetworkError, cniruntime.CNIError, OSError) as e:
            log.error("lab failed: %s", e)
            self.phase, self.error = "failed", str(e)
            self.save_status()
        except Exception as e:  # a bug: still report it, never hang `lab up`
            log.exception("lab failed")
            self.phase, self.error = "failed", f"{type(e).__name__}: {e}"
            self.save_status()

    # -- pods (the kubelet role) --------------------------------------------------------
    def new_pod_state(self, pod: Pod) -> PodState:
        ps = PodState(pod, str(uuid.uuid4()), pod_netns(self.paths.prefix, pod.namespace, pod.name),
                      pod.node)
        self.pods[pod.key] = ps
        return ps

    def pod_hosts(self, ps: PodState) -> str:
        return hosts_file(ps.pod.namespace, ps.pod.name, ps.ip, list(self.res.services.values()))

    def runtime_conf(self, ps: PodState) -> cniruntime.RuntimeConf:
        return cniruntime.RuntimeConf(
            container_id=ps.uid.replace("-", ""),
            netns=str(network.NETNS_DIR / ps.netns),
            ifname="eth0",
            args=cniruntime.k8s_args(ps.pod.namespace, ps.pod.name, ps.uid),
            cni_path=str(self.paths.cni_bin),
        )

    def node_wrapper(self, node: str) -> list[str]:
        # the bridge plugin builds cni0 in its current netns: the node's, as on a real host
        return ["ip", "netns", "exec", node_netns(self.paths.prefix, node)]

    def read_conflist(self, node: str) -> dict[str, Any]:
        path = self.paths.conflist(node)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"CNI configuration {path} unreadable: {e}") from None

    def resolve_command(self, pod: Pod) -> list[str]:
        argv = list(pod.command)
        path = f"{venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if argv[0] == "nodeproxy":
            argv[0] = str(venv_bin() / "nodeproxy")
        exe = shutil.which(argv[0], path=path)
        if exe is None:
            raise LabError(f"Pod {pod.key}: command {argv[0]!r} not found")
        return argv

    async def cni_add(self, ps: PodState) -> Any:
        rt = self.runtime_conf(ps)
        wrapper = self.node_wrapper(ps.node)
        await cniruntime.run_single("ADD", cniruntime.LOOPBACK_CONF, rt, wrapper)
        deadline = trio.current_time() + CNI_RETRY_FOR
        while True:
            conf = self.read_conflist(ps.node)
            try:
                return await cniruntime.run_conflist("ADD", conf, rt, None, wrapper)
            except cniruntime.CNIError as e:
                # a failed ADD is undone with DEL before anything else, as runtimes do
                try:
                    await cniruntime.run_conflist("DEL", conf, rt, None, wrapper)
                except cniruntime.CNIError:
                    pass
                retry = e.code == 11 or e.plugin not in _PLAIN_PLUGINS
                if not retry or trio.current_time() > deadline:
                    raise
                log.info("pod %s: %s; retrying", ps.pod.key, e)
                await trio.sleep(1.0)

    async def start_pod(self, ps: PodState) -> None:
        """Sandbox (netns + CNI ADD), then status, names, and the pod's command."""
        assert self.nursery is not None
        pod = ps.pod
        self.set_step(f"starting pod {pod.key} on {ps.node}")
        argv = self.resolve_command(pod)
        ps.state = "networking"
        await trio.to_thread.run_sync(network.add_netns, ps.netns)
        self._made_etc.add(ps.netns)
        network.write_etc(ps.netns, self.pod_hosts(ps), resolv_conf(pod.namespace))
        try:
            result = await self.cni_add(ps)
        except cniruntime.CNIError as e:
            ps.state, ps.error = "failed", str(e)
            raise LabError(f"Pod {pod.key}: network setup failed: {e}") from None
        ps.cni_result = result
        ps.meshed_add = self.spec.mesh
        (self.paths.cni_cache / f"{ps.uid}.json").write_text(json.dumps(result))
        ips = cniruntime.result_ips(result)
        if not ips:
            raise LabError(f"Pod {pod.key}: the CNI result has no IP address")
        ps.ip = ips[0]
        self.write_resource(pod_resource(pod, ps.uid, ps.ip, "Running"))
        network.write_etc(ps.netns, self.pod_hosts(ps), resolv_conf(pod.namespace))
        env = self.component_env()
        env.update(
            POD_NAME=pod.name, POD_NAMESPACE=pod.namespace, POD_IP=ps.ip, NODE_NAME=ps.node,
            HOSTNAME=pod.name,
        )
        ps.proc = Proc(f"pod-{pod.namespace}-{pod.name}", argv, ps.netns,
                       self.paths.log(f"pod-{pod.namespace}-{pod.name}"), env)

        def exited(ps: PodState = ps) -> None:
            if ps.state == "running":
                ps.state = "exited"
            self.save_status()

        await ps.proc.start(self.nursery, exited)
        ps.state = "running"
        self.save_status()

    # -- VMs ----------------------------------------------------------------------------
    def vm_hosts(self, vm: VM) -> str:
        return hosts_file(vm.namespace, vm.name, vm.underlay_ip, list(self.res.services.values()))

    async def start_vm_app(self, vm: VM) -> None:
        """The VM's own command, in its netns (captured by its host-mode node proxy)."""
        assert self.nursery is not None
        if not vm.command:
            return
        self.set_step(f"starting the app of VM {vm.name}")
        argv = self.resolve_command(vm.as_pod())
        env = self.component_env()
        env.update(
            POD_NAME=vm.name, POD_NAMESPACE=vm.namespace, POD_IP=vm.underlay_ip,
            NODE_NAME=vm.name, HOSTNAME=vm.name,
        )
        name = f"vm-{vm.name}"
        proc = Proc(name, argv, vm_netns(self.paths.prefix, vm.name), self.paths.log(name), env)
        self.vm_procs[vm.name] = proc
        await proc.start(self.nursery, self.save_status)

    async def stop_pod(self, ps: PodState) -> None:
        """Stop the command, CNI DEL (reverse chain, cached result), remove the netns."""
        ps.state = "deleting"
        if ps.proc is not None:
            await ps.proc.stop()
        if ps.cni_result is not None or (network.NETNS_DIR / ps.netns).exists():
            rt = self.runtime_conf(ps)
            wrapper = self.node_wrapper(ps.node)
            try:
                conf = self.read_conflist(ps.node)
                await cniruntime.run_conflist("DEL", conf, rt, ps.cni_result, wrapper)
            except (cniruntime.CNIError, LabError) as e:
                log.warning("pod %s: CNI DEL: %s", ps.pod.key, e)
            try:
                await cniruntime.run_single("DEL", cniruntime.LOOPBACK_CONF, rt, wrapper)
            except cniruntime.CNIError as e:
                log.warning("pod %s: loopback DEL: %s", ps.pod.key, e)
        await trio.to_thread.run_sync(network.del_netns, ps.netns)
        network.remove_etc(ps.netns)
        self._made_etc.discard(ps.netns)
        (self.paths.cni_cache / f"{ps.uid}.json").unlink(missing_ok=True)

    # -- services (the kube-proxy role) -------------------------------------------------
    async def refresh_services(self) -> None:
        running = [(ps.pod, ps.ip) for ps in self.pods.values() if ps.ip and ps.state == "running"]
        # VMs are endpoints too when a service selects them (the WorkloadEntry's labels)
        running += [(vm.as_pod(), vm.underlay_ip) for vm in self.spec.vms]
        services = list(self.res.services.values())
        for n in self.spec.nodes:
            rules = kube_proxy_rules(services, running, n.pod_cidr)
            await trio.to_thread.run_sync(
                network.apply_kube_proxy, node_netns(self.paths.prefix, n.name), rules
            )
        for ps in self.pods.values():
            if ps.netns in self._made_etc:
                network.write_etc(ps.netns, self.pod_hosts(ps), resolv_conf(ps.pod.namespace))
        for vm in self.spec.vms:
            ns = vm_netns(self.paths.prefix, vm.name)
            if ns in self._made_etc:
                network.write_etc(ns, self.vm_hosts(vm), resolv_conf(vm.namespace))

    # -- runtime changes (CLI requests) -------------------------------------------------
    async def apply(self, text: str, source: str) -> dict[str, Any]:
        docs = load_documents(text, source)
        if any(d["kind"] == "Lab" for d in docs):
            raise LabSpecError(f"{source}: a Lab document cannot be applied to a running lab")
        new = parse_resources(docs, source)
        check_pods_placed(self.spec, new.pods.values())
        services: dict[str, Service] = dict(self.res.services)
        for key, svc in new.services.items():
            old = services.get(key)
            if svc.cluster_ip is None and old is not None:
                svc.cluster_ip = old.cluster_ip  # an update keeps the address, as in Kubernetes
            services[key] = svc
        assign_cluster_ips(services)
        changed = []
        self.res.services = services
        for key, doc in new.namespaces.items():
            self.res.namespaces[key] = doc
            self.write_resource(doc)
            changed.append(f"namespace/{key}")
        for key, svc in new.services.items():
            self.write_resource(service_resource(svc))
            changed.append(f"service/{key}")
        for key, doc in new.others.items():
            self.res.others[key] = doc
            self.write_resource(doc)
            changed.append(key.lower())
        for key, pod in new.pods.items():
            old_ps = self.pods.get(key)
            if old_ps is not None and old_ps.pod.doc == pod.doc and old_ps.state == "running":
                continue
            if old_ps is not None:
                await self.stop_pod(old_ps)
                del self.pods[key]
            self.res.pods[key] = pod
            self.ensure_namespaces()
            for ns in {pod.namespace}:
                self.write_resource(self.res.namespaces[ns])
            ps = self.new_pod_state(pod)
            self.write_resource(pod_resource(pod, ps.uid))
            try:
                await self.start_pod(ps)
            finally:
                await self.refresh_services()
            changed.append(f"pod/{key}")
        self.ensure_namespaces()
        changed += await self.reconcile_gateways()
        await self.refresh_services()
        self.save_status()
        return {"changed": changed}

    async def delete(self, kind: str, ref: str) -> dict[str, Any]:
        kind = kind.lower()
        ns, _, name = ref.rpartition("/")
        if kind == "namespace":
            name = ref
            if name not in self.res.namespaces:
                raise LabError(f"namespace {name} not found")
            users = [k for k in list(self.pods) + list(self.res.services)
                     + [vm.key for vm in self.spec.vms]
                     if k.split("/")[0] == name]
            if users:
                raise LabError(f"namespace {name} still holds {', '.join(sorted(users))}")
            del self.res.namespaces[name]
            self.remove_resource("Namespace", "", name)
        elif not ns:
            raise LabError(f"give the {kind} as NAMESPACE/NAME")
        elif kind == "pod":
            ps = self.pods.get(f"{ns}/{name}")
            if ps is None:
                raise LabError(f"pod {ns}/{name} not found")
            await self.stop_pod(ps)
            del self.pods[ps.pod.key]
            self.res.pods.pop(ps.pod.key, None)
            self.remove_resource("Pod", ns, name)
        elif kind == "service":
            if self.res.services.pop(f"{ns}/{name}", None) is None:
                raise LabError(f"service {ns}/{name} not found")
            self.remove_resource("Service", ns, name)
        else:
            match = [k for k in self.res.others if k.lower() == f"{kind}/{ns}/{name}"]
            if not match:
                raise LabError(f"{kind} {ns}/{name} not found")
            doc = self.res.others.pop(match[0])
            self.remove_resource(doc["kind"], ns, name)
        await self.refresh_services()
        self.save_status()
        return {"deleted": f"{kind}/{ref}"}

    async def label(self, namespace: str, changes: list[str]) -> dict[str, Any]:
        doc = self.res.namespaces.get(namespace)
        if doc is None:
            raise LabError(f"namespace {namespace} not found")
        labels = doc.setdefault("metadata", {}).setdefault("labels", {}) or {}
        for ch in changes:
            if ch.endswith("-") and "=" not in ch:
                labels.pop(ch[:-1], None)
            elif "=" in ch and ch.split("=", 1)[0]:
                k, v = ch.split("=", 1)
                labels[k] = v
            else:
                raise LabError(f"bad label change {ch!r}: use key=value or key-")
        doc["metadata"]["labels"] = labels
        self.write_resource(doc)
        changed = await self.reconcile_gateways()
        await self.refresh_services()
        self.save_status()
        return {"labels": labels, "changed": changed}

    async def restart(self, name: str) -> dict[str, Any]:
        assert self.nursery is not None
        proc = self.components.get(name)
        if proc is None:
            proc = next((p for p in self.vm_procs.values() if p.name == name), None)
        if proc is None:
            for ps in self.pods.values():
                if ps.proc is not None and ps.proc.name == name:
                    proc = ps.proc
                    break
        if proc is None:
            known = sorted(self.components) + sorted(
                p.proc.name for p in self.pods.values() if p.proc
            ) + sorted(p.name for p in self.vm_procs.values())
            raise LabError(f"no component {name!r}; known: {', '.join(known)}")
        await proc.stop()
        await proc.start(self.nursery, self.save_status)
        for ps in self.pods.values():
            if ps.proc is proc:
                ps.state = "running"
        self.save_status()
        return {"restarted": name, "pid": proc.process.pid if proc.process else None}

    async def capture_cmd(self, action: str) -> dict[str, Any]:
        assert self.nursery is not None
        if action == "start":
            if self.capture is not None and self.capture.state == "running":
                raise LabError("a capture is already running")
            self.capture = Proc(
                "capture",
                ["tcpdump", "-i", BRIDGE, "-n", "-U", "--immediate-mode", "-Z", "root",
                 "-w", str(self.paths.capture_file)],
                underlay_netns(self.paths.prefix),
                self.paths.log("capture"),
            )
            await self.capture.start(self.nursery, self.save_status)
            # tcpdump says "listening on" once the capture runs; wait for it briefly
            with trio.move_on_after(5):
                while b"listening on" not in self.paths.log("capture").read_bytes():
                    if self.capture.state != "running":
                        raise LabError("tcpdump exited; see `nodeproxy lab logs capture`")
                    await trio.sleep(0.05)
            return {"file": str(self.paths.capture_file)}
        if action == "stop":
            if self.capture is None or self.capture.state != "running":
                raise LabError("no capture is running")
            await self.capture.stop(signal.SIGINT)
            return {"file": str(self.paths.capture_file)}
        raise LabError("capture takes start or stop")

    # -- control socket -----------------------------------------------------------------
    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if self.phase != "running" and op not in ("shutdown",):
            raise LabError(f"the lab is {self.phase} ({self.error or self.step})")
        async with self.lock:
            if op == "apply":
                return {"ok": True, **await self.apply(str(req["text"]), str(req.get("source")))}
            if op == "delete":
                return {"ok": True, **await self.delete(str(req["kind"]), str(req["ref"]))}
            if op == "label":
                return {
                    "ok": True,
                    **await self.label(str(req["namespace"]), list(req["changes"])),
                }
            if op == "restart":
                return {"ok": True, **await self.restart(str(req["component"]))}
            if op == "capture":
                return {"ok": True, **await self.capture_cmd(str(req["action"]))}
        raise LabError(f"unknown request {op!r}")

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            try:
                with trio.fail_after(10):
                    while not buf.endswith(b"\n"):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        buf += chunk
                        if len(buf) > MAX_REQUEST:
                            raise LabError("request too large")
                req = json.loads(buf)
                if not isinstance(req, dict):
                    raise LabError("request is not a JSON object")
                reply = await self.handle(req)
            except (LabError, LabSpecError, network.NetworkError, cniruntime.CNIError,
                    ValueError, KeyError, OSError, trio.TooSlowError) as e:
                reply = {"ok": False, "error": str(e) or type(e).__name__}
            except Exception as e:
                log.exception("request failed")
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    async def serve_control(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = self.paths.control_socket
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.serve_connection, [listener])

    # -- teardown -----------------------------------------------------------------------
    async def teardown(self) -> None:
        self.phase = "stopping"
        self.save_status()
        if self.capture is not None:
            await self.capture.stop(signal.SIGINT)
        for ps in list(self.pods.values()):
            try:
                await self.stop_pod(ps)
            except Exception:
                log.exception("pod %s teardown", ps.pod.key)
        for proc in self.vm_procs.values():
            await proc.stop()
        for vm in self.spec.vms:
            network.remove_etc(vm_netns(self.paths.prefix, vm.name))
        for name in reversed(list(self.components)):
            await self.components[name].stop()
        for ns in reversed(self._created_ns):
            await trio.to_thread.run_sync(network.del_netns, ns)
        removed = await trio.to_thread.run_sync(network.sweep, self.paths.prefix, None)
        if removed:
            log.warning("swept leftovers: %s", ", ".join(removed))


async def run(paths: LabPaths) -> int:
    try:
        spec = parse_lab(paths.lab_file.read_text(), str(paths.lab_file))
    except (OSError, LabSpecError) as e:
        log.error("%s", e)
        return 2
    sup = Supervisor(paths, spec)
    try:
        async with trio.open_nursery() as nursery:
            sup.nursery = nursery

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for s in sigs:
                        log.info("signal %s: tearing down", s)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signals)
            await nursery.start(sup.serve_control)
            await sup.bring_up()
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 120
            # a nursery for the process waiters teardown may restart nothing into
            async with trio.open_nursery() as n2:
                sup.nursery = n2
                try:
                    await sup.teardown()
                except Exception:
                    log.exception("teardown")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nodeproxy.lab.supervisor LABDIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        print(f"lab config unreadable: {e}", file=sys.stderr)
        return 2
    paths = LabPaths(root, cfg["prefix"])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    paths.pidfile.write_text(f"{os.getpid()}\n")
    rc = trio.run(run, paths)
    # last: the lab dir (logs included) goes; `lab down` waits for the lock to be released
    shutil.rmtree(paths.root, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
