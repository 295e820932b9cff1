"""Node proxies with worker processes (`nodeproxy ztunnel --workers 2`) in the lab.

Both nodes run two workers sharing the pod listeners (SO_REUSEPORT): meshed traffic crosses
them, connections land on both workers of each node (their own counters say so), the node's
/metrics is their sum, a killed worker is restarted and traffic carries on, and `lab down`
leaves no process or namespace behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.lab.meshlab import Lab, metric_sum, running_lab, wait_for

pytestmark = pytest.mark.lab

LAB_DIR = "/run/nodeproxy-test-workers"
OPENED = "istio_tcp_connections_opened_total"


def lab_processes(lab_dir: str) -> list[int]:
    """Processes whose command line names the lab directory (node proxies, workers, agents)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(lab_dir.encode() in a for a in argv):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def lab():
    try:
        with running_lab(LAB_DIR, "npt-wk-", "tests/lab/workers.yaml") as lab:
            yield lab
    finally:
        left = wait_for_none(lambda: lab_processes(LAB_DIR))
        assert not left, f"processes left behind by lab down: {left}"


def wait_for_none(fn):  # type: ignore[no-untyped-def]
    try:
        return wait_for("no processes left", lambda: not fn(), timeout=15) and []
    except AssertionError:
        return fn()


def workers(lab: Lab, node: str) -> list[dict]:
    return lab.admin(node, "/workers")


def worker_metrics(lab: Lab, node: str) -> list[str]:
    """Each worker's own /metrics (on its private port, inside the node netns)."""
    return [lab.node_http(node, f"http://127.0.0.1:{w['ports']['metrics']}/metrics")
            for w in workers(lab, node)]


def curl_many(lab: Lab, url: str, n: int, caller: str = "shop/client") -> list[str]:
    """``n`` separate connections from ``caller``; their HTTP status codes."""
    script = (f"for i in $(seq {n}); do curl -sS -m 5 -o /dev/null -w '%{{http_code}}\\n' "
              f"{url} || echo failed; done")
    proc = lab.exec(caller, "sh", "-c", script, timeout=n * 6 + 30)
    return proc.stdout.split()


def opened_per_worker(lab: Lab, node: str, reporter: str) -> list[float]:
    return [metric_sum(t, OPENED, reporter=reporter, destination_workload="server")
            for t in worker_metrics(lab, node)]


def spread(lab: Lab, node: str, reporter: str, caller: str, n: int = 60) -> list[float]:
    """Per worker of ``node``: connections it opened for ``n`` new ones from ``caller``."""
    before = opened_per_worker(lab, node, reporter)
    codes = curl_many(lab, f"http://{lab.ip('shop/server')}:8080/", n, caller)
    assert codes == ["200"] * n, (caller, codes)
    after = opened_per_worker(lab, node, reporter)
    return [b - a for a, b in zip(before, after, strict=True)]


def test_two_workers_per_node_serve_meshed_traffic_and_both_take_connections(lab: Lab):
    for node in ("node-a", "node-b"):
        ws = workers(lab, node)
        assert [w["state"] for w in ws] == ["live", "live"], ws
        assert len({w["pid"] for w in ws}) == 2
    client_ip, server_ip = lab.ip("shop/client"), lab.ip("shop/server")
    answer = lab.curl_json("shop/client", f"http://{server_ip}:8080/hello")
    assert answer and answer["pod"] == "server"
    # the destination worker spoofs the caller's address (IP_TRANSPARENT) from its own socket
    assert answer["peer"].split(":")[0] == client_ip

    # the client's connections to 15001 in its pod are spread over node-a's two workers
    per_worker = spread(lab, "node-a", "source", "shop/client")
    assert sum(per_worker) == 60 and all(c > 0 for c in per_worker), per_worker
    # on node-b they arrive inside pooled HBONE tunnels (one per source worker): counted once
    # each, whichever worker holds the tunnel
    merged = metric_sum(lab.metrics("node-b"), OPENED, reporter="destination",
                        destination_workload="server", connection_security_policy="mutual_tls")
    assert merged == sum(opened_per_worker(lab, "node-b", "destination")) >= 61
    # connections from outside the mesh reach node-b's 15006 one by one: spread too
    per_worker = spread(lab, "node-b", "destination", "legacy/outsider")
    assert sum(per_worker) == 60 and all(c > 0 for c in per_worker), per_worker


def test_node_admin_pages_merge_the_workers(lab: Lab):
    pods = lab.admin("node-b", "/pods")
    assert sorted((p["name"], p["worker"]) for p in pods) == [("server", 0), ("server", 1)]
    assert any(w["name"] == "server" for w in lab.admin("node-b", "/workloads"))
    ready = lab.node_http("node-b", "http://127.0.0.1:15021/healthz/ready")
    assert ready == "ready"


def test_a_killed_worker_is_restarted_and_traffic_continues(lab: Lab):
    server_ip = lab.ip("shop/server")
    for node, reporter, caller in (("node-b", "destination", "legacy/outsider"),
                                   ("node-a", "source", "shop/client")):
        before = workers(lab, node)
        victim = before[1]
        os.kill(victim["pid"], signal.SIGKILL)
        # right away: the kernel sends new connections to the surviving worker
        codes = curl_many(lab, f"http://{server_ip}:8080/", 10)
        assert codes == ["200"] * 10, (node, codes)

        def restarted(node: str = node, victim: dict = victim) -> list[dict] | None:
            ws = workers(lab, node)
            w = ws[1]
            ok = w["state"] == "live" and w["pid"] != victim["pid"] and \
                w["starts"] == victim["starts"] + 1
            return ws if ok else None

        after = wait_for(f"worker 1 of {node} restarted", restarted, timeout=60)
        assert after[0]["pid"] == before[0]["pid"]  # the other worker was left alone
        assert lab.node_http(node, "http://127.0.0.1:15021/healthz/ready") == "ready"
        # the new worker was replayed the pods and takes connections again
        per_worker = spread(lab, node, reporter, caller, 40)
        assert all(c > 0 for c in per_worker), (node, per_worker)
    restarts = metric_sum(lab.metrics("node-b"), "nodeproxy_ztunnel_worker_restarts_total")
    assert restarts == 1
