"""The lab file, the names and rules derived from it, and the CNI runtime's chaining."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from nodeproxy.lab import cniruntime
from nodeproxy.lab.components import component_specs, conflist
from nodeproxy.lab.paths import LabPaths
from nodeproxy.lab.spec import (
    MAX_NETNS_NAME,
    LabSpecError,
    hosts_file,
    kube_proxy_rules,
    node_netns,
    parse_lab,
    pod_netns,
    pod_resource,
    resolv_conf,
    service_resource,
)
from nodeproxy.model import allocate_cluster_ips

ROOT = Path(__file__).resolve().parents[2]

LAB = """
apiVersion: nodeproxy.io/v1alpha1
kind: Lab
spec:
  nodes: [{name: a}, {name: b}]
"""


def pod(name: str, node: str = "a", ns: str = "web", labels: str = "{app: echo}",
        command: str = "[sleep, infinity]", ports: str = "[]") -> str:
    return f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}
spec:
  nodeName: {node}
  containers: [{{name: c, command: {command}, ports: {ports}}}]
"""


def service(name: str, ns: str = "web", cluster_ip: str | None = None,
            target: str = "8080") -> str:
    cip = f"\n  clusterIP: {cluster_ip}" if cluster_ip else ""
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:{cip}
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: {target}, name: http}}]
"""


def test_demo_file_parses() -> None:
    spec = parse_lab((ROOT / "examples" / "demo.yaml").read_text())
    assert [n.name for n in spec.nodes] == ["node-a", "node-b"]
    assert [(n.underlay_ip, n.pod_cidr) for n in spec.nodes] == [
        ("10.250.0.10", "10.244.1.0/24"),
        ("10.250.0.11", "10.244.2.0/24"),
    ]
    pods = spec.resources.pods
    assert set(pods) == {
        "shop/client", "shop/intruder", "shop/backend-a", "shop/backend-b", "legacy/outsider",
        "store/web-v1", "store/web-v2", "store/pay-ok", "store/pay-broken",
    }
    assert pods["shop/backend-b"].node == "node-b"
    assert pods["shop/intruder"].service_account == "intruder"
    assert spec.mesh is True
    assert spec.resources.namespaces["shop"]["metadata"]["labels"] == {
        "nodeproxy.io/dataplane-mode": "ambient"
    }
    # policies and routes go to the control plane exactly as written
    assert list(spec.resources.others) == [
        "AuthorizationPolicy/shop/deny-intruder",
        "HTTPRoute/store/web-canary",
        "HTTPRoute/store/pay-retries",
    ]


def test_cluster_ips_are_allocated_as_the_control_plane_does() -> None:
    spec = parse_lab(
        LAB + service("zeta") + service("alpha") + service("fixed", cluster_ip="10.96.0.2")
    )
    got = {k: s.cluster_ip for k, s in spec.resources.services.items()}
    assert got == allocate_cluster_ips(
        [("web/zeta", None), ("web/alpha", None), ("web/fixed", "10.96.0.2")]
    )
    assert got["web/fixed"] == "10.96.0.2"
    assert got["web/alpha"] == "10.96.0.3"  # .1 is reserved, .2 taken
    doc = service_resource(spec.resources.services["web/alpha"])
    assert doc["spec"]["clusterIP"] == "10.96.0.3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LAB + pod("x", node="nowhere"), "nodeName 'nowhere' is not a lab node"),
        (LAB + pod("x") + pod("x", node="b"), "duplicate Pod web/x"),
        (LAB + pod("x", command="[]"), "command missing"),
        (LAB + pod("x").replace("command: [sleep, infinity], ", ""), "command missing"),
        (LAB + "\n---\nkind: [unclosed\n", "bad YAML"),
        (pod("x"), "exactly one kind: Lab"),
        (LAB + "\n---\napiVersion: v1\nkind: Deployment\nmetadata: {name: d}\n", "Deployment"),
        (LAB.replace("{name: b}", "{name: a}"), "duplicate node a"),
        (LAB + service("s", cluster_ip="10.96.0.9") + service("t", cluster_ip="10.96.0.9"),
         "already used"),
        (LAB + pod("Bad_Name"), "not a DNS label"),
    ],
)
def test_bad_lab_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(LabSpecError, match=message):
        parse_lab(text)


def test_netns_names_are_short_and_stable() -> None:
    assert node_netns("npl-", "node-a") == "npl-node-node-a"
    assert pod_netns("npl-", "shop", "client") == "npl-shop-client"
    ns, name = "a-rather-long-namespace-name", "and-an-even-longer-pod-name"
    long = pod_netns("npt-lab-", ns, name)
    assert len(long) <= MAX_NETNS_NAME and long.startswith("npt-lab-a-rather")
    assert long == pod_netns("npt-lab-", ns, name)
    assert long != pod_netns("npt-lab-", ns, name + "2")


def test_hosts_file_names_services_the_way_callers_write_them() -> None:
    spec = parse_lab(LAB + service("echo") + service("db", ns="data"))
    svcs = list(spec.resources.services.values())
    text = hosts_file("web", "client", "10.244.1.5", svcs)
    lines = {line.split("\t")[0]: line.split("\t")[1].split() for line in text.splitlines()
             if "\t" in line}
    echo_ip = spec.resources.services["web/echo"].cluster_ip
    db_ip = spec.resources.services["data/db"].cluster_ip
    assert lines["10.244.1.5"] == ["client"]
    assert lines[echo_ip] == [
        "echo.web.svc.cluster.local", "echo.web.svc", "echo.web", "echo"
    ]
    # a bare name only for the pod's own namespace
    assert lines[db_ip] == ["db.data.svc.cluster.local", "db.data.svc", "db.data"]
    assert lines["127.0.0.1"] == ["localhost"]
    assert "search web.svc.cluster.local svc.cluster.local cluster.local" in resolv_conf("web")


def test_pod_resource_carries_uid_and_status_after_network() -> None:
    spec = parse_lab(LAB + pod("x"))
    p = spec.resources.pods["web/x"]
    before = pod_resource(p, "uid-1")
    assert before["metadata"]["uid"] == "uid-1" and "status" not in before
    after = pod_resource(p, "uid-1", "10.244.1.7")
    assert after["status"] == {
        "phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}]
    }
    assert "uid" not in (p.doc["metadata"])  # the file's document is left alone


def test_kube_proxy_rules_spread_over_endpoints_and_resolve_named_ports() -> None:
    spec = parse_lab(
        LAB
        + pod("e1", ports="[{containerPort: 9000, name: web}]")
        + pod("e2", node="b", ports="[{containerPort: 9001, name: web}]")
        + pod("other", labels="{app: other}")
        + service("echo", target="web")
    )
    pods = spec.resources.pods
    running = [(pods["web/e1"], "10.244.1.2"), (pods["web/e2"], "10.244.2.2"),
               (pods["web/other"], "10.244.1.3")]
    rules = kube_proxy_rules(list(spec.resources.services.values()), running, "10.244.1.0/24")
    vip = spec.resources.services["web/echo"].cluster_ip
    dnat = [r for r in rules.splitlines() if "-j DNAT" in r]
    assert len(dnat) == 2
    assert f"-d {vip}/32" in dnat[0] and "--dport 80" in dnat[0]
    assert "--probability 0.5000000000" in dnat[0] and dnat[0].endswith("10.244.1.2:9000")
    assert "statistic" not in dnat[1] and dnat[1].endswith("10.244.2.2:9001")
    assert ":NPLAB-SERVICES - [0:0]" in rules  # declaring the chain replaces its rules
    assert "-s 10.244.1.0/24 -d 10.244.1.0/24 -m conntrack --ctstate DNAT -j MASQUERADE" in rules


def test_mesh_off_runs_no_components_and_no_project_plugin(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path, "npt-lab-")
    off = parse_lab(LAB.replace("spec:\n", "spec:\n  mesh: false\n"))
    assert component_specs(off, paths) == []
    assert [p["type"] for p in conflist(off, paths, "b")["plugins"]] == ["bridge"]
    on = parse_lab(LAB)
    comps = component_specs(on, paths)
    assert [c.name for c in comps] == [
        "controlplane", "cni-agent-a", "ztunnel-a", "cni-agent-b", "ztunnel-b"
    ]
    assert comps[0].netns == "npt-lab-underlay" and comps[1].netns == "npt-lab-node-a"
    assert comps[0].argv[1:4] == ["-m", "nodeproxy.cli", "controlplane"]
    assert "--listen" in comps[0].argv and "10.250.0.1:15012" in comps[0].argv
    cl = conflist(on, paths, "b")
    assert cl["cniVersion"] == "1.0.0" and cl["name"] == "nodeproxy-lab"
    assert [p["type"] for p in cl["plugins"]] == ["bridge", "nodeproxy-cni"]
    assert cl["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24"}]]
    assert cl["plugins"][1]["agentSocket"] == str(tmp_path / "nodes" / "b" / "plugin.sock")


# -- the CNI runtime ---------------------------------------------------------------------

RT = cniruntime.RuntimeConf(
    container_id="c0ffee",
    netns="/run/netns/npt-lab-x",
    args=cniruntime.k8s_args("web", "x", "uid-1"),
    cni_path="/cni",
)


def test_plugin_config_merges_list_fields_and_prev_result() -> None:
    cl = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}, {"type": "p2"}]}
    first = cniruntime.plugin_config(cl, cl["plugins"][0], None)
    assert first == {"type": "bridge", "cniVersion": "1.0.0", "name": "n"}
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}]}
    second = cniruntime.plugin_config(cl, cl["plugins"][1], prev)
    assert second["prevResult"] == prev and second["type"] == "p2"
    inv = cniruntime.invocation("ADD", second, RT, base_env={})
    assert inv.plugin == "p2"
    assert json.loads(inv.stdin) == second
    assert inv.env == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/npt-lab-x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=x;K8S_POD_UID=uid-1",
        "CNI_PATH": "/cni",
    }


def test_plugin_errors_become_clear_exceptions() -> None:
    err = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "bad config", "details": "x"})
    with pytest.raises(cniruntime.CNIError, match=r"bridge failed \(code 7\): bad config: x"):
        cniruntime.parse_output("bridge", "ADD", 1, err.encode(), b"")
    with pytest.raises(cniruntime.CNIError, match="exited with status 2.*boom"):
        cniruntime.parse_output("p", "ADD", 2, b"", b"boom")
    with pytest.raises(cniruntime.CNIError, match="not JSON"):
        cniruntime.parse_output("p", "ADD", 0, b"garbage", b"")
    assert cniruntime.parse_output("p", "DEL", 0, b"", b"") is None
    assert cniruntime.result_ips({"ips": [{"address": "10.244.1.2/24"}]}) == ["10.244.1.2"]
    with pytest.raises(cniruntime.CNIError, match="no plugins"):
        cniruntime.validate_conflist({"plugins": []})


def _recording_plugin(d: Path, name: str, ip: str | None) -> None:
    """A tiny plugin: logs command and stdin, answers its prevResult (+ an IP if given)."""
    script = d / name
    add_ip = f'r.setdefault("ips", []).append({{"address": "{ip}/24"}})' if ip else ""
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import json, os, sys
        conf = json.load(sys.stdin)
        with open(os.path.join({str(d)!r}, "calls.log"), "a") as f:
            f.write(json.dumps([os.environ["CNI_COMMAND"], {name!r}, conf]) + "\\n")
        if os.environ["CNI_COMMAND"] == "ADD":
            r = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"]}}
            {add_ip}
            print(json.dumps(r))
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


async def test_conflist_add_chains_prev_result_and_del_runs_in_reverse(tmp_path: Path) -> None:
    _recording_plugin(tmp_path, "first", "10.244.1.9")
    _recording_plugin(tmp_path, "second", None)
    cl = {"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "first", "k": 1},
                                                            {"type": "second"}]}
    rt = cniruntime.RuntimeConf("c1", "/run/netns/none", cni_path=str(tmp_path))
    result = await cniruntime.run_conflist("ADD", cl, rt)
    assert cniruntime.result_ips(result) == ["10.244.1.9"]
    await cniruntime.run_conflist("DEL", cl, rt, cached_result=result)
    calls = [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert [(c[0], c[1]) for c in calls] == [
        ("ADD", "first"), ("ADD", "second"), ("DEL", "second"), ("DEL", "first")
    ]
    assert "prevResult" not in calls[0][2] and calls[0][2]["k"] == 1
    assert calls[1][2]["prevResult"] == result
    assert calls[2][2]["prevResult"] == result and calls[3][2]["prevResult"] == result


async def test_missing_plugin_fails_the_add(tmp_path: Path) -> None:
    cl = {"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "absent"}]}
    rt = cniruntime.RuntimeConf("c1", "/run/netns/none", cni_path=str(tmp_path))
    with pytest.raises(cniruntime.CNIError, match="not found in CNI_PATH"):
        await cniruntime.run_conflist("ADD", cl, rt)
    assert not os.listdir(tmp_path)
