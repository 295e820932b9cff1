"""The lab's network with the real CNI plugins (no mesh): pods, routes, services, teardown.

Runs ``nodeproxy lab`` as a user would (a subprocess per command), with the netns prefix
``npt-lab-`` and a temporary lab dir; every test leaves nothing behind, even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodeproxy.lab import network

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not Path("/usr/lib/cni/bridge").exists(), reason="needs CNI plugins"),
]

PREFIX = "npt-lab-"
ECHO = [sys.executable, "-m", "nodeproxy.echo", "--port", "8080"]

LAB_FILE = f"""
apiVersion: nodeproxy.io/v1alpha1
kind: Lab
spec:
  mesh: false
  nodes: [{{name: n1}}, {{name: n2}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: web}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-a, namespace: web, labels: {{app: echo}}}}
spec:
  nodeName: n1
  containers: [{{name: app, command: {json.dumps(ECHO)}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-b, namespace: web, labels: {{app: echo}}}}
spec:
  nodeName: n2
  containers: [{{name: app, command: {json.dumps(ECHO)}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: web}}
spec:
  nodeName: n1
  containers: [{{name: app, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: web}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: 8080, name: http}}]
"""


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, NODEPROXY_LAB_DIR=str(root / "lab"),
                        NODEPROXY_LAB_PREFIX=PREFIX)

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "nodeproxy.lab.cli", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"lab {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def up(self, text: str = LAB_FILE) -> subprocess.CompletedProcess[str]:
        f = self.root / "lab.yaml"
        f.write_text(text)
        return self.run("up", str(f), check=False)

    def status(self) -> dict:
        return json.loads(self.run("status", "--json").stdout)

    def curl(self, pod: str, url: str) -> dict:
        out = self.run("exec", pod, "--", "curl", "-sS", "-m", "5", url).stdout
        return json.loads(out)

    def down(self) -> None:
        self.run("down", check=False)


def _leftovers() -> list[str]:
    etc = [d.name for d in network.ETC_NETNS_DIR.glob(f"{PREFIX}*")]
    return network.list_netns(PREFIX) + etc


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if _leftovers():
        pytest.skip(f"leftovers of an earlier run: {_leftovers()}")
    root = Path(tempfile.mkdtemp(prefix="npt-lab-"))
    lab = Lab(root)
    try:
        up = lab.up()
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        yield lab
    finally:
        lab.down()
        network.sweep(PREFIX, None)
        shutil.rmtree(root, ignore_errors=True)


def test_status_shows_nodes_and_running_pods(lab: Lab) -> None:
    st = lab.status()
    assert st["phase"] == "running" and st["mesh"] is False
    assert [(n["name"], n["netns"], n["underlay_ip"], n["pod_cidr"]) for n in st["nodes"]] == [
        ("n1", "npt-lab-node-n1", "10.250.0.10", "10.244.1.0/24"),
        ("n2", "npt-lab-node-n2", "10.250.0.11", "10.244.2.0/24"),
    ]
    pods = {p["name"]: p for p in st["pods"]}
    assert set(pods) == {"echo-a", "echo-b", "client"}
    for p in pods.values():
        assert p["state"] == "running" and p["meshed"] is False
        assert p["netns"] == f"npt-lab-web-{p['name']}"
    assert pods["echo-a"]["ip"].startswith("10.244.1.")
    assert pods["client"]["ip"].startswith("10.244.1.")
    assert pods["echo-b"]["ip"].startswith("10.244.2.")
    # the real bridge plugin made cni0 in the node netns, gateway .1
    out = network.run(["ip", "-n", "npt-lab-node-n1", "-4", "addr", "show", "cni0"])
    assert "10.244.1.1/24" in out
    # the control plane's view: the pod rewritten with its IP and uid
    res = Path(st["lab_dir"]) / "resources" / "pod-web-echo-b.yaml"
    doc = yaml.safe_load(res.read_text())
    assert doc["status"]["podIP"] == pods["echo-b"]["ip"]
    assert doc["metadata"]["uid"] == pods["echo-b"]["uid"]


def test_pods_reach_each_other_across_and_within_nodes(lab: Lab) -> None:
    pods = {p["name"]: p for p in lab.status()["pods"]}
    client_ip = pods["client"]["ip"]
    other = lab.curl("web/client", f"http://{pods['echo-b']['ip']}:8080/x")
    assert other["pod"] == "echo-b" and other["path"] == "/x"
    assert other["peer"].split(":")[0] == client_ip  # routed, not NATed
    same = lab.curl("web/client", f"http://{pods['echo-a']['ip']}:8080/")
    assert same["pod"] == "echo-a" and same["peer"].split(":")[0] == client_ip


def test_service_names_resolve_and_kube_proxy_dnat_reaches_both_endpoints(lab: Lab) -> None:
    seen = set()
    for _ in range(40):
        seen.add(lab.curl("web/client", "http://echo.web/")["pod"])
        if seen == {"echo-a", "echo-b"}:
            break
    assert seen == {"echo-a", "echo-b"}
    assert lab.curl("web/client", "http://echo/")["pod"] in seen
    assert lab.curl("web/client", "http://echo.web.svc.cluster.local:80/")["pod"] in seen
    # and from a node itself (the OUTPUT chain)
    assert lab.curl("node/n2", "http://10.96.0.2/")["pod"] in seen


def test_second_up_is_refused(lab: Lab) -> None:
    again = lab.up()
    assert again.returncode != 0
    assert "already running" in again.stderr
    assert lab.status()["phase"] == "running"


def answer_once_up(lab: Lab, pod: str, url: str) -> dict:
    """The echo answer to ``url`` from ``pod``, retried for up to 5 s while the app starts."""
    for _ in range(50):
        try:
            return lab.curl(pod, url)
        except (AssertionError, ValueError):
            time.sleep(0.1)
    return lab.curl(pod, url)  # the last try's error is the test's


def test_runtime_apply_label_restart_delete_and_capture(lab: Lab) -> None:
    extra = lab.root / "extra.yaml"
    extra.write_text(f"""
apiVersion: v1
kind: Pod
metadata: {{name: late, namespace: other, labels: {{app: late}}}}
spec:
  nodeName: n2
  containers: [{{name: app, command: {json.dumps(ECHO[:-1] + ["9090"])}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: late, namespace: other}}
spec:
  selector: {{app: late}}
  ports: [{{port: 90, targetPort: 9090}}]
""")
    lab.run("capture", "start")
    lab.run("apply", str(extra))
    # running is not listening yet (as a Kubernetes pod before its readiness probe passes)
    assert answer_once_up(lab, "web/client", "http://late.other:90/")["pod"] == "late"
    lab.run("capture", "stop")
    pcap = Path(lab.status()["lab_dir"]) / "capture.pcap"
    dump = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True)
    assert ".9090" in dump.stdout  # the DNATed flow crossed the underlay

    lab.run("label", "namespace", "web", "nodeproxy.io/dataplane-mode=ambient")
    ns = Path(lab.status()["lab_dir"]) / "resources" / "namespace-web.yaml"
    assert "nodeproxy.io/dataplane-mode: ambient" in ns.read_text()
    lab.run("label", "namespace", "web", "nodeproxy.io/dataplane-mode-")
    assert "dataplane-mode" not in ns.read_text()

    before = {p["name"]: p for p in lab.status()["pods"]}["echo-a"]
    lab.run("restart", "pod-web-echo-a")
    assert answer_once_up(lab, "web/client", f"http://{before['ip']}:8080/")["pod"] == "echo-a"
    assert "starting" in lab.run("logs", "pod-web-echo-a").stdout

    lab.run("delete", "pod", "other/late")
    lab.run("delete", "service", "other/late")
    st = lab.status()
    assert "late" not in {p["name"] for p in st["pods"]}
    assert "npt-lab-other-late" not in network.list_netns(PREFIX)
    bad = lab.run("delete", "pod", "other/late", check=False)
    assert bad.returncode != 0 and "not found" in bad.stderr


def test_down_removes_everything(lab: Lab) -> None:
    st = lab.status()
    pids = network.pids_in_netns(network.list_netns(PREFIX)) + [st["supervisor_pid"]]
    assert len(pids) >= 4
    lab.run("down")
    assert _leftovers() == []
    assert not Path(st["lab_dir"]).exists()
    assert not [p for p in pids if network.pid_alive(p)]
    assert lab.run("status", check=False).returncode != 0


def test_down_cleans_up_after_the_supervisor_was_killed() -> None:
    if _leftovers():
        pytest.skip(f"leftovers of an earlier run: {_leftovers()}")
    root = Path(tempfile.mkdtemp(prefix="npt-lab-"))
    lab = Lab(root)
    try:
        up = lab.up()
        assert up.returncode == 0, up.stderr
        st = lab.status()
        pids = network.pids_in_netns(network.list_netns(PREFIX))
        assert pids
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        # everything still there: a new `up` must refuse until `down` ran
        assert network.list_netns(PREFIX)
        refused = lab.up()
        assert refused.returncode != 0 and "lab down" in refused.stderr
        lab.run("down")
        assert _leftovers() == []
        assert not (root / "lab").exists()
        assert not [p for p in pids if network.pid_alive(p)]
    finally:
        lab.down()
        network.sweep(PREFIX, None)
        shutil.rmtree(root, ignore_errors=True)


def test_bad_lab_file_touches_nothing(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    bad = lab.up(LAB_FILE.replace("nodeName: n2", "nodeName: n9"))
    assert bad.returncode == 2 and "'n9' is not a lab node" in bad.stderr
    assert _leftovers() == [] and not (tmp_path / "lab").exists()
