"""`nodeproxy demo` (what `make demo` runs): a lab mesh, traffic through it, what happened.

It brings up examples/demo.yaml, sends a few flows (allowed, denied, from outside the mesh),
captures the lab's underlay meanwhile, and then explains each flow from the node proxies'
access logs and metrics, with the packet capture as proof of what crossed between nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodeproxy import pcap
from nodeproxy.lab.paths import LabPaths
from nodeproxy.telemetry.accesslog import parse_line

ROOT = Path(__file__).resolve().parents[1]
DEMO_FILE = ROOT / "examples" / "demo.yaml"
MARKER = "demo-secret-7c41"


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "nodeproxy.cli", "lab", *args], capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: `nodeproxy lab {' '.join(args)}` failed")
    return proc


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 74 - len(text)))


def curl(pod: str, url: str) -> tuple[bool, dict[str, Any] | str]:
    proc = lab("exec", pod, "--", "curl", "-sS", "-m", "5", url, check=False)
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["failed"])[-1]
    try:
        return True, json.loads(proc.stdout)
    except ValueError:
        return True, proc.stdout.strip()


def send_traffic(status: dict[str, Any]) -> list[str]:
    pods = {f"{p['namespace']}/{p['name']}": p for p in status["pods"]}
    lines = []

    def flow(title: str, pod: str, url: str) -> None:
        ok, answer = curl(pod, url)
        if ok and isinstance(answer, dict):
            result = f"answered by {answer.get('pod')}, which saw the caller as " + str(
                answer.get("peer")
            )
        else:
            result = f"refused ({answer})"
        lines.append(f"  {title:<46} {pod:>16} -> {url}\n  {'':<46} {result}")
        print(lines[-1])

    heading("Traffic")
    for i in range(4):
        flow(f"client calls the backend service ({i + 1}/4)", "shop/client",
             f"http://backend.shop/{MARKER}")
    flow("client calls backend-b's pod IP (other node)", "shop/client",
         f"http://{pods['shop/backend-b']['ip']}:8080/{MARKER}")
    flow("intruder calls the backend (policy: DENY)", "shop/intruder", "http://backend.shop/")
    flow("outsider (namespace not in the mesh) calls", "legacy/outsider",
         f"http://{pods['shop/backend-b']['ip']}:8080/")
    return lines


LOOP = """
import collections, http.client, json
conn = http.client.HTTPConnection({host!r}, 80, timeout=15)
counts = collections.Counter()
for i in range({n}):
    conn.request({method!r}, "/", body={body!r})
    r = conn.getresponse()
    try:
        pod = json.loads(r.read()).get("pod")
    except ValueError:
        pod = "?"
    counts["%d from %s" % (r.status, pod)] += 1
print(json.dumps(counts))
"""


def request_loop(host: str, n: int, method: str = "GET", body: str | None = None) -> dict:
    script = LOOP.format(host=host, n=n, method=method, body=body)
    proc = lab("exec", "shop/client", "--", sys.executable, "-c", script, check=False)
    if proc.returncode != 0:
        return {"failed": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(proc.stdout)


def gateway_retries() -> int:
    from prometheus_client.parser import text_string_to_metric_families

    proc = lab("exec", "store/nodeproxy-gateway", "--", "curl", "-sS", "-m", "5",
               "http://127.0.0.1:15020/metrics", check=False)
    total = 0.0
    for fam in text_string_to_metric_families(proc.stdout if proc.returncode == 0 else ""):
        for sample in fam.samples:
            if sample.name == "nodeproxy_gateway_retries_total":
                total += sample.value
    return int(total)


def show_gateway() -> None:
    heading("The L7 gateway of namespace store (label nodeproxy.io/l7-gateway: enabled)")
    counts = request_loop("web.store", 100)
    print("  canary split (HTTPRoute web-canary: web-v1 80, web-v2 20), 100 requests:")
    for key, n in sorted(counts.items()):
        print(f"    {n:>4} x {key}")
    before = gateway_retries()
    counts = request_loop("pay.store", 30)
    after = gateway_retries()
    print("  a flaky backend (pay-broken answers 503 to everything; HTTPRoute pay-retries")
    print("  retries 503 up to 3 times), 30 GET requests:")
    for key, n in sorted(counts.items()):
        print(f"    {n:>4} x {key}")
    print(f"    the gateway retried {after - before} time(s) and every request succeeded; its")
    print("    balancer (two random choices, by latency and failures; ejection after repeated")
    print("    failures) also learns to keep traffic away from pay-broken")
    counts = request_loop("pay.store", 30, "POST", "pay=1")
    print("  the same with 30 POST requests (not idempotent: never retried after a 503):")
    for key, n in sorted(counts.items()):
        print(f"    {n:>4} x {key}")


def access_log(paths: LabPaths, nodes: list[str]) -> list[dict[str, str]]:
    entries = []
    for node in nodes:
        try:
            text = paths.log(f"ztunnel-{node}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            entry = parse_line(line)
            if entry is not None:
                entry["node"] = node
                entries.append(entry)
    return entries


def short_id(identity: str | None) -> str:
    if not identity:
        return "(no identity)"
    return identity.removeprefix("spiffe://cluster.local/")


def explain_flows(entries: list[dict[str, str]]) -> None:
    heading("What the destination node proxies saw (one line per connection)")
    print(f"  {'caller':<22} {'identity':<24} {'callee':<12} {'mTLS':<5} "
          f"{'bytes in/out':<13} result")
    for e in entries:
        if e.get("direction") != "inbound" or e.get("dst.namespace") == "store":
            continue
        caller = f"{e.get('src.namespace', '?')}/{e.get('src.workload', '?')}"
        if caller == "?/?":
            caller = e.get("src.addr", "?")
        mtls = "yes" if e.get("dst.hbone_addr") else "no"
        result = "DENIED: " + e["error"] if "policy" in e.get("error", "") else (
            e.get("error") or "ok")
        print(f"  {caller:<22} {short_id(e.get('src.identity')):<24} "
              f"{e.get('dst.workload', '?'):<12} {mtls:<5} "
              f"{e.get('bytes_recv', '0') + '/' + e.get('bytes_sent', '0'):<13} {result}")


def explain_capture(path: Path, status: dict[str, Any]) -> None:
    heading("Proof from a packet capture on the underlay (between nodes)")
    pod_ips = {p["ip"]: f"{p['namespace']}/{p['name']}" for p in status["pods"] if p.get("ip")}
    found = pcap.contains(path, MARKER.encode())
    crossing = [f for f in pcap.flows(path) if f.a[0] in pod_ips or f.b[0] in pod_ips]
    by_port: dict[tuple[int, bool], list[pcap.Flow]] = {}
    for f in crossing:
        server_port = f.a[1]
        by_port.setdefault((server_port, f.tls), []).append(f)
    for (port, tls), flows in sorted(by_port.items()):
        peers = sorted({pod_ips.get(x[0], x[0]) for f in flows for x in (f.a, f.b)})
        kind = "TLS" if tls else "plain TCP"
        print(f"  to port {port:<6} {kind:<10} {len(flows)} TCP connection(s), "
              f"{sum(f.payload_bytes for f in flows)} payload bytes, between {', '.join(peers)}")
    meshed = [f for f in crossing if f.a[1] == 15008]
    other = [f for f in crossing if f.a[1] != 15008 and f.payload_bytes]
    print()
    print(f"  the marker {MARKER!r} sent by the client in its requests: "
          f"{'FOUND in clear text (bad!)' if found else 'not found anywhere on the wire'}")
    if meshed and all(f.tls for f in meshed if f.payload_bytes):
        print("  every connection between meshed pods crossed as TLS to port 15008 (HBONE);")
        print("  the client's requests to the other node shared pooled tunnel connections")
    if other:
        print("  plain TCP crossed only for the caller outside the mesh (legacy/outsider), "
              "which the destination's node proxy took on port 15006")


def explain_metrics(paths: LabPaths, nodes: list[str]) -> None:
    heading("Prometheus metrics (istio_tcp_connections_opened_total, destination side)")
    from prometheus_client.parser import text_string_to_metric_families

    for node in nodes:
        proc = lab("exec", f"node/{node}", "--", "curl", "-sS", "-m", "5",
                   "http://127.0.0.1:15020/metrics", check=False)
        if proc.returncode != 0:
            continue
        for fam in text_string_to_metric_families(proc.stdout):
            for s in fam.samples:
                if s.name in ("istio_tcp_connections_opened_total",
                              "istio_tcp_connections_failed_total") and \
                        s.labels.get("reporter") == "destination":
                    flags = s.labels.get("response_flags", "-")
                    extra = f", {flags}" if flags != "-" else ""
                    print(f"  {node}: {s.name.removeprefix('istio_tcp_')}"
                          f"{{{s.labels['source_workload']} -> "
                          f"{s.labels['destination_workload']}, "
                          f"{s.labels['connection_security_policy']}{extra}"
                          f"}} = {int(s.value)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nodeproxy demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    parser.add_argument("--file", type=Path, default=DEMO_FILE)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root: it builds network namespaces", file=sys.stderr)
        return 1
    paths = LabPaths.from_env()
    shown = args.file.relative_to(ROOT) if args.file.is_relative_to(ROOT) else args.file
    heading(f"Bringing up the lab from {shown}")
    started = time.monotonic()
    lab("up", str(args.file))
    print(f"  (up in {time.monotonic() - started:.1f} s)")
    ok = False
    try:
        status = json.loads(lab("status", "--json").stdout)
        heading("The cluster")
        print(indent(lab("status").stdout.rstrip(), "  "))
        nodes = [n["name"] for n in status["nodes"]]
        lab("capture", "start")
        try:
            time.sleep(0.5)
            send_traffic(status)
            time.sleep(0.5)
        finally:
            lab("capture", "stop")
        time.sleep(0.5)  # the last access-log lines
        show_gateway()
        explain_flows(access_log(paths, nodes))
        explain_metrics(paths, nodes)
        explain_capture(paths.capture_file, status)
        ok = True
    finally:
        if args.keep and ok:
            heading("The lab keeps running; explore it with")
            print(indent(textwrap_commands()))
        else:
            heading("Tearing down")
            lab("down", check=False)
            print("  done")
    return 0


def textwrap_commands() -> str:
    return "\n".join([
        ".venv/bin/nodeproxy lab status",
        ".venv/bin/nodeproxy lab exec shop/client -- curl -s http://backend.shop/",
        ".venv/bin/nodeproxy lab exec shop/intruder -- curl -s http://backend.shop/",
        ".venv/bin/nodeproxy lab exec shop/client -- curl -s http://web.store/",
        ".venv/bin/nodeproxy lab logs pod-store-nodeproxy-gateway",
        ".venv/bin/nodeproxy lab exec node/node-a -- curl -s 127.0.0.1:15000/connections",
        ".venv/bin/nodeproxy lab exec node/node-b -- curl -s 127.0.0.1:15020/metrics",
        ".venv/bin/nodeproxy lab logs ztunnel-node-b",
        ".venv/bin/nodeproxy lab down",
    ])
