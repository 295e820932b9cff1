"""The L4 mesh end to end in the lab: capture, HBONE, identities, policy, enrolment, CA.

One lab (tests/lab/mesh.yaml) is shared by the module; tests that change it put it back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from nodeproxy import pcap
from tests.lab.meshlab import ROOT, Lab, metric_sum, running_lab, wait_for

pytestmark = pytest.mark.lab

CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"


@pytest.fixture(scope="module")
def mesh():
    with running_lab("/run/nodeproxy-test-mesh", "npt-mesh-", "tests/lab/mesh.yaml") as lab:
        yield lab


def echo(lab: Lab, pod: str, url: str) -> dict:
    answer = lab.curl_json(pod, url)
    assert answer is not None, f"{pod} -> {url} failed:\n{lab.curl(pod, url).stderr}"
    return answer


def quietly(fn):
    """``fn()``, or None while the thing it asks is not up (a restart in progress)."""
    try:
        return fn()
    except (AssertionError, ValueError):
        return None


def denied(lab: Lab, pod: str, url: str) -> bool:
    return lab.curl(pod, url).returncode != 0


def policy(name: str, ns: str, spec: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: security.nodeproxy.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
        """
    ) + textwrap.indent(textwrap.dedent(spec), "  ")


# -- traffic --------------------------------------------------------------------------------


def test_cross_node_pod_to_pod_is_mutual_tls_and_app_sees_caller_ip(mesh: Lab):
    client_ip, backend_ip = mesh.ip("shop/client"), mesh.ip("shop/backend-b")
    answer = echo(mesh, "shop/client", f"http://{backend_ip}:8080/hello")
    assert answer["pod"] == "backend-b"
    assert answer["peer"].split(":")[0] == client_ip
    metrics = mesh.metrics("node-b")
    assert metric_sum(
        metrics,
        "istio_tcp_connections_opened_total",
        reporter="destination",
        source_workload="client",
        destination_workload="backend-b",
        connection_security_policy="mutual_tls",
    ) >= 1
    source_side = mesh.metrics("node-a")
    assert metric_sum(
        source_side,
        "istio_tcp_connections_opened_total",
        reporter="source",
        source_workload="client",
        destination_workload="backend-b",
        connection_security_policy="mutual_tls",
    ) >= 1


def test_same_node_pod_to_pod(mesh: Lab):
    client_ip, backend_ip = mesh.ip("shop/client"), mesh.ip("shop/backend-a")
    answer = echo(mesh, "shop/client", f"http://{backend_ip}:8080/")
    assert answer["pod"] == "backend-a"
    assert answer["peer"].split(":")[0] == client_ip
    assert metric_sum(
        mesh.metrics("node-a"),
        "istio_tcp_connections_opened_total",
        reporter="destination",
        destination_workload="backend-a",
        connection_security_policy="mutual_tls",
    ) >= 1


def test_pod_to_service_by_name_reaches_both_endpoints(mesh: Lab):
    seen = set()
    for _ in range(30):
        seen.add(echo(mesh, "shop/client", "http://backend.shop/")["pod"])
        if seen == {"backend-a", "backend-b"}:
            break
    assert seen == {"backend-a", "backend-b"}
    full = echo(mesh, "shop/client", "http://backend.shop.svc.cluster.local:90/")
    assert full["pod"] in {"backend-a", "backend-b"}


def test_no_plaintext_on_the_underlay(mesh: Lab):
    marker = "nodeproxy-marker-4f1c9a7e"
    backend_ip = mesh.ip("shop/backend-b")
    client_ip = mesh.ip("shop/client")
    mesh.cli("capture", "start")
    try:
        for _ in range(3):
            answer = echo(
                mesh, "shop/client", f"http://{backend_ip}:8080/{marker}?q={marker}"
            )
            assert marker in answer["path"]
    finally:
        mesh.cli("capture", "stop")
    capture = mesh.dir / "capture.pcap"
    assert capture.exists()
    assert not pcap.contains(capture, marker.encode()), "plaintext marker seen on the underlay"
    flows = pcap.flows(capture)
    tunnels = [f for f in flows if {f.a, f.b} & {(backend_ip, 15008)}]
    assert tunnels, f"no HBONE flow to {backend_ip}:15008 in {flows}"
    assert all(f.tls for f in tunnels if f.payload_bytes)
    assert any(client_ip in (f.a[0], f.b[0]) for f in tunnels)
    plain = [f for f in flows if (backend_ip, 8080) in (f.a, f.b)]
    assert not plain, f"direct plaintext flow to the app port: {plain}"


def test_meshed_pod_to_destination_outside_the_mesh_passes_through(mesh: Lab):
    answer = echo(mesh, "shop/client", "http://plainweb.legacy/")
    assert answer["pod"] == "plainweb"
    assert answer["peer"].split(":")[0] == mesh.ip("shop/client")


# -- policy ---------------------------------------------------------------------------------


def test_deny_by_principal(mesh: Lab):
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    assert denied(mesh, "shop/intruder", url)
    assert echo(mesh, "shop/client", url)["pod"] == "backend-b"
    assert "policy rejection" in mesh.logs("ztunnel-node-b")


def test_allow_by_namespace(mesh: Lab):
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    assert echo(mesh, "other/caller", url)["pod"] == "backend-b"
    mesh.apply(
        policy(
            "only-shop",
            "shop",
            """\
            selector: {matchLabels: {app: backend}}
            action: ALLOW
            rules:
            - from: [{source: {namespaces: [shop]}}]
            """,
        )
    )
    try:
        wait_for("caller from namespace other denied", lambda: denied(mesh, "other/caller", url))
        assert echo(mesh, "shop/client", url)["pod"] == "backend-b"
    finally:
        mesh.delete("authorizationpolicy", "shop/only-shop")
    wait_for("caller allowed again", lambda: mesh.curl_json("other/caller", url))


def test_allow_by_port(mesh: Lab):
    ip = mesh.ip("shop/backend-a")
    mesh.apply(
        policy(
            "only-8080",
            "shop",
            """\
            selector: {matchLabels: {app: backend}}
            action: ALLOW
            rules:
            - to: [{operation: {ports: ["8080"]}}]
            """,
        )
    )
    try:
        wait_for("port 9090 denied", lambda: denied(mesh, "shop/client", f"http://{ip}:9090/"))
        assert echo(mesh, "shop/client", f"http://{ip}:8080/")["pod"] == "backend-a"
    finally:
        mesh.delete("authorizationpolicy", "shop/only-8080")
    wait_for("9090 allowed again", lambda: mesh.curl_json("shop/client", f"http://{ip}:9090/"))


# -- outside the mesh -----------------------------------------------------------------------


def test_non_ambient_namespace_is_not_captured(mesh: Lab):
    rules = mesh.exec("legacy/outsider", "iptables-save").stdout
    assert "ISTIO_OUTPUT" not in rules
    assert "ISTIO_OUTPUT" in mesh.exec("shop/client", "iptables-save").stdout
    answer = echo(mesh, "legacy/outsider", f"http://{mesh.ip('legacy/plainweb')}:8080/")
    assert answer["peer"].split(":")[0] == mesh.ip("legacy/outsider")


def test_outsider_reaches_mesh_pod_through_15006_under_policy(mesh: Lab):
    outsider_ip = mesh.ip("legacy/outsider")
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    answer = echo(mesh, "legacy/outsider", url)
    assert answer["peer"].split(":")[0] == outsider_ip
    assert metric_sum(
        mesh.metrics("node-b"),
        "istio_tcp_connections_opened_total",
        reporter="destination",
        destination_workload="backend-b",
        source_workload="outsider",
        connection_security_policy="unknown",
    ) >= 1
    mesh.apply(
        policy(
            "only-client",
            "shop",
            f"""\
            selector: {{matchLabels: {{app: backend}}}}
            action: ALLOW
            rules:
            - from: [{{source: {{principals: ["{CLIENT_ID.removeprefix('spiffe://')}"]}}}}]
            """,
        )
    )
    try:
        wait_for("plaintext caller denied", lambda: denied(mesh, "legacy/outsider", url))
        assert echo(mesh, "shop/client", url)["pod"] == "backend-b"
    finally:
        mesh.delete("authorizationpolicy", "shop/only-client")
    wait_for("outsider allowed again", lambda: mesh.curl_json("legacy/outsider", url))


# -- enrolment and CNI ----------------------------------------------------------------------


def test_labelling_a_namespace_enrols_running_pods_without_restart(mesh: Lab):
    pid_before = mesh.pod("legacy/outsider").get("pid")
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    mesh.cli("label", "namespace", "legacy", "nodeproxy.io/dataplane-mode=ambient")
    try:
        wait_for(
            "outsider captured",
            lambda: "ISTIO_OUTPUT" in mesh.exec("legacy/outsider", "iptables-save").stdout,
        )
        wait_for(
            "outsider's pod proxy on node-b",
            lambda: any(p["name"] == "outsider" for p in mesh.admin("node-b", "/pods")),
        )

        def tunneled():
            echo(mesh, "legacy/outsider", url)
            return metric_sum(
                mesh.metrics("node-b"),
                "istio_tcp_connections_opened_total",
                reporter="destination",
                source_principal="spiffe://cluster.local/ns/legacy/sa/default",
                connection_security_policy="mutual_tls",
            )

        wait_for("outsider's traffic over mTLS", tunneled)
        assert mesh.pod("legacy/outsider").get("pid") == pid_before
    finally:
        mesh.cli("label", "namespace", "legacy", "nodeproxy.io/dataplane-mode-")
    wait_for(
        "outsider released",
        lambda: "ISTIO_OUTPUT" not in mesh.exec("legacy/outsider", "iptables-save").stdout,
    )
    wait_for(
        "outsider's pod proxy gone",
        lambda: not any(p["name"] == "outsider" for p in mesh.admin("node-b", "/pods")),
    )
    assert echo(mesh, "legacy/outsider", url)["pod"] == "backend-b"


def test_pod_delete_runs_cni_del_and_cleans_up(mesh: Lab):
    mesh.apply(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: Pod
            metadata: {name: temp, namespace: shop, labels: {app: temp}}
            spec:
              nodeName: node-b
              serviceAccountName: temp
              containers: [{name: c, command: [sleep, infinity]}]
            """
        )
    )
    wait_for(
        "temp enrolled", lambda: any(p["name"] == "temp" for p in mesh.admin("node-b", "/pods"))
    )
    netns = mesh.pod("shop/temp")["netns"]
    mesh.delete("pod", "shop/temp")
    wait_for(
        "temp's pod proxy gone",
        lambda: not any(p["name"] == "temp" for p in mesh.admin("node-b", "/pods")),
    )
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout


# -- certificates and the control plane ---------------------------------------------------

LONG_CLIENT = """
import socket, sys, time
s = socket.create_connection(("{ip}", 8080), timeout=10)
ok = 0
try:
    for i in range({n}):
        line = ("tick %d\\n" % i).encode()
        s.sendall(line)
        got = b""
        while not got.endswith(b"\\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        ok += got == line
        time.sleep({pause})
except OSError as exc:
    print("connection error:", exc, flush=True)
print("echoed", ok, "of", {n}, flush=True)
"""


def long_connection(lab: Lab, pod: str, ip: str, n: int, pause: float) -> subprocess.Popen:
    script = LONG_CLIENT.format(ip=ip, n=n, pause=pause)
    return subprocess.Popen(
        [sys.executable, "-m", "nodeproxy.cli", "lab", "exec", pod, "--", sys.executable,
         "-c", script],
        env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def client_serial(lab: Lab) -> str | None:
    for cert in lab.admin("node-a", "/certificates"):
        if cert["identity"] == CLIENT_ID and cert.get("state") == "valid":
            return cert["serial"]
    return None


def test_long_connection_survives_certificate_renewal(mesh: Lab):
    first = wait_for("client certificate", lambda: client_serial(mesh))
    proc = long_connection(mesh, "shop/client", mesh.ip("shop/backend-b"), n=60, pause=0.5)
    try:
        wait_for(
            "client certificate renewed",
            lambda: (s := client_serial(mesh)) and s != first and s,
            timeout=40,
        )
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "echoed 60 of 60" in out, err
    # new connections use the new certificate too
    assert echo(mesh, "shop/client", f"http://{mesh.ip('shop/backend-b')}:8080/")


def test_controlplane_restart_does_not_lose_traffic(mesh: Lab):
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    proc = long_connection(mesh, "shop/client", mesh.ip("shop/backend-b"), n=20, pause=0.3)
    try:
        mesh.cli("restart", "controlplane")
        assert echo(mesh, "shop/client", url)["pod"] == "backend-b"
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "echoed 20 of 20" in out, err
    # the node proxies reconnected: a new policy still reaches them
    mesh.apply(
        policy(
            "deny-client-after-restart",
            "shop",
            """\
            selector: {matchLabels: {app: backend}}
            action: DENY
            rules:
            - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
            """,
        )
    )
    try:
        wait_for("policy after restart applied", lambda: denied(mesh, "shop/client", url),
                 timeout=40)
    finally:
        mesh.delete("authorizationpolicy", "shop/deny-client-after-restart")
    wait_for("client allowed again", lambda: mesh.curl_json("shop/client", url))


# -- bad input ------------------------------------------------------------------------------


def test_malformed_resource_is_reported_and_last_good_state_kept(mesh: Lab):
    broken = mesh.dir / "resources" / "zz-broken.yaml"
    broken.write_text("kind: Service\nmetadata: [this is: not valid\n")
    try:
        def reported():
            proc = mesh.exec("node/node-a", "curl", "-sS", "http://10.250.0.1:15014/debug/errors")
            return proc.returncode == 0 and "zz-broken.yaml" in proc.stdout

        wait_for("the control plane reports the broken file", reported)
        assert echo(mesh, "shop/client", "http://backend.shop/")["pod"].startswith("backend-")
    finally:
        broken.unlink()


def probe(lab: Lab, case: str, target: str, **extra: str) -> dict:
    args = [
        sys.executable, "-m", "tests.lab.hbone_probe", "--case", case, "--target", target,
        "--ca-dir", str(lab.dir / "controlplane" / "ca"),
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    proc = lab.exec("node/node-a", "env", f"PYTHONPATH={ROOT}", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hbone_connect_works_for_a_good_request(mesh: Lab):
    ip = mesh.ip("shop/backend-b")
    assert probe(mesh, "ok", ip) == {"status": 200, "echo": "ping from probe\n"}


def test_hbone_connect_to_an_address_the_pod_does_not_serve_is_400(mesh: Lab):
    ip = mesh.ip("shop/backend-b")
    other = mesh.ip("shop/backend-a")
    assert probe(mesh, "wrong-address", ip, authority=f"{other}:8080") == {"status": 400}


def test_hbone_non_connect_request_is_400(mesh: Lab):
    assert probe(mesh, "not-connect", mesh.ip("shop/backend-b")) == {"status": 400}


def test_hbone_oversize_headers_refused_and_server_survives(mesh: Lab):
    result = probe(mesh, "big-headers", mesh.ip("shop/backend-b"))
    assert result["big"].get("status") != 200
    assert result["after"]["status"] == 200


def test_hbone_client_certificate_from_another_ca_is_refused(mesh: Lab):
    result = probe(mesh, "foreign-ca", mesh.ip("shop/backend-b"))
    assert result.get("refused") or result.get("error"), result
    assert result.get("status") != 200
    # and the pod still serves good callers
    assert probe(mesh, "ok", mesh.ip("shop/backend-b"))["status"] == 200


def test_components_never_crashed(mesh: Lab):
    status = mesh.status()
    for node in status["nodes"]:
        for name, comp in node.get("components", {}).items():
            assert comp.get("state") == "running", (name, comp)
    logs = mesh.logs("ztunnel-node-a") + mesh.logs("ztunnel-node-b")
    at = logs.find("Traceback")
    assert at < 0, logs[max(0, at - 400) : at + 4000]  # the first one, whole
    time.sleep(0)


def test_policy_change_closes_live_connections_it_now_denies(mesh: Lab):
    ip = mesh.ip("shop/backend-b")
    proc = long_connection(mesh, "shop/client", ip, n=80, pause=0.25)
    try:
        wait_for(
            "the long connection is live on node-b",
            lambda: any(
                c.get("src.workload") == "client" and c.get("direction") == "inbound"
                for c in mesh.admin("node-b", "/connections")
            ),
        )
        mesh.apply(
            policy(
                "deny-client-live",
                "shop",
                """\
                selector: {matchLabels: {app: backend}}
                action: DENY
                rules:
                - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
                """,
            )
        )
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        mesh.delete("authorizationpolicy", "shop/deny-client-live")
    # the connection was cut before its 80 exchanges were done
    assert "echoed 80 of 80" not in out
    assert "policy now denies" in mesh.logs("ztunnel-node-b")
    wait_for("client allowed again", lambda: mesh.curl_json("shop/client", f"http://{ip}:8080/"))


def test_node_proxy_restart_gets_pods_back_from_the_agent(mesh: Lab):
    url = f"http://{mesh.ip('shop/backend-b')}:8080/"
    mesh.cli("restart", "ztunnel-node-b")
    wait_for(
        "node-b's proxy ready with its pods again",
        lambda: quietly(
            lambda: {p["name"] for p in mesh.admin("node-b", "/pods")} >= {"backend-b", "caller"}
        ),
        timeout=40,
    )
    assert mesh.node_http("node-b", "http://127.0.0.1:15021/healthz/ready") == "ready"
    assert echo(mesh, "shop/client", url)["pod"] == "backend-b"
    assert echo(mesh, "other/caller", url)["pod"] == "backend-b"


HALF_CLOSE_CLIENT = """
import socket
got = b""
try:
    s = socket.create_connection(("{ip}", {port}), timeout=10)
    s.sendall(b"abc")
    s.shutdown(socket.SHUT_WR)
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    print("EOF", repr(got))
except ConnectionResetError:
    print("RESET", repr(got))
except OSError as exc:
    print("ERROR", exc)
"""


def run_in_pod(lab: Lab, pod: str, script: str) -> str:
    proc = lab.exec(pod, sys.executable, "-c", script, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_half_close_travels_end_to_end(mesh: Lab):
    ip = mesh.ip("shop/backend-b")
    out = run_in_pod(mesh, "shop/client", HALF_CLOSE_CLIENT.format(ip=ip, port=8080))
    # the app saw our EOF (through both node proxies) and could still answer afterwards
    assert out == "EOF b'abc[eof after 3 bytes]\\n'"


def test_upstream_refusal_reaches_the_caller_as_a_reset(mesh: Lab):
    ip = mesh.ip("shop/backend-b")
    out = run_in_pod(mesh, "shop/client", HALF_CLOSE_CLIENT.format(ip=ip, port=7777))
    assert out.startswith(("RESET", "ERROR")), out
    assert "app unreachable" in mesh.logs("ztunnel-node-b")


def test_hbone_connect_to_a_closed_port_is_503(mesh: Lab):
    assert probe(mesh, "ok", mesh.ip("shop/backend-b"), port="7777") == {"status": 503}
