"""The benchmark harness's pure parts: tool output parsers, ratios, the report, the lab file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import cases, lab, report
from benchmarks.tools import (
    ToolOutputError,
    h2load_cmd,
    h2load_rate_cmd,
    iperf3_cmd,
    median,
    parse_cpu_model,
    parse_duration_ms,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3,
    parse_proc_stat_cpu_ticks,
    parse_status_kb,
    parse_wrk,
    prom_sum,
    ratio,
    wrk_cmd,
)

# recorded from wrk 4.1.0 (Debian) against a local HTTP server
WRK_LATENCY = """\
Running 1s test @ http://127.0.0.1:28080/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.52ms    1.09ms  10.21ms   69.90%
    Req/Sec   771.10     67.81     0.88k    60.00%
  Latency Distribution
     50%    2.43ms
     75%    3.12ms
     90%    3.84ms
     99%    5.84ms
  771 requests in 1.00s, 1.46MB read
Requests/sec:    767.81
Transfer/sec:      1.46MB
"""

WRK_ERRORS = """\
Running 2s test @ http://10.244.2.2:8080/1k
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    20.11ms   12.30ms 301.00ms   90.00%
    Req/Sec     1.52k   100.00     1.70k    70.00%
  3040 requests in 2.00s, 3.67MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1520.40
Transfer/sec:      1.84MB
"""


def iperf_json(**end: object) -> str:
    return json.dumps({"start": {}, "intervals": [], "end": end})


def test_wrk_latency_distribution_and_totals():
    r = parse_wrk(WRK_LATENCY)
    assert r.requests == 771
    assert r.seconds == pytest.approx(1.0)
    assert r.requests_per_second == pytest.approx(767.81)
    assert r.latency_ms == {50: 2.43, 75: 3.12, 90: 3.84, 99: 5.84}
    assert r.errors == 0


def test_wrk_errors_are_counted():
    r = parse_wrk(WRK_ERRORS)
    assert r.socket_errors == {"connect": 0, "read": 12, "write": 0, "timeout": 3}
    assert r.non_2xx == 7
    assert r.errors == 22
    assert r.latency_ms == {}  # no --latency: no distribution


def test_wrk_failure_output_raises():
    with pytest.raises(ToolOutputError):
        parse_wrk("unable to connect to 127.0.0.1:28081 Connection refused")


@pytest.mark.parametrize(
    "text,ms", [("85.12us", 0.08512), ("1.02ms", 1.02), ("2.00s", 2000.0), ("1.50m", 90000.0)]
)
def test_wrk_durations(text, ms):
    assert parse_duration_ms(text) == pytest.approx(ms)


def test_wrk_duration_garbage():
    with pytest.raises(ToolOutputError):
        parse_duration_ms("fast")


def test_iperf3_totals_from_receiver():
    text = iperf_json(
        sum_sent={"bytes": 2391932928, "seconds": 1.00046, "bits_per_second": 1.91e10,
                  "retransmits": 4},
        sum_received={"bytes": 2391932928, "seconds": 1.001063,
                      "bits_per_second": 19115144025.9},
    )
    r = parse_iperf3(text)
    assert r.bits_per_second == pytest.approx(19115144025.9)
    assert r.bytes == 2391932928
    assert r.retransmits == 4


def test_iperf3_error_raises():
    text = json.dumps({"start": {}, "end": {},
                       "error": "unable to connect to server: Connection refused"})
    with pytest.raises(ToolOutputError, match="Connection refused"):
        parse_iperf3(text)
    with pytest.raises(ToolOutputError):
        parse_iperf3("iperf3: error - the server is busy running a test")
    with pytest.raises(ToolOutputError):
        parse_iperf3(iperf_json(sum_sent={"bits_per_second": 1.0}))


def test_command_lines():
    assert iperf3_cmd("10.0.0.2", 5201, 0.4, 8) == [
        "iperf3", "-c", "10.0.0.2", "-p", "5201", "-t", "1", "-P", "8", "-J"]
    cmd = wrk_cmd("http://h/1k", 1, 32, close=True, latency=True)
    assert cmd[-1] == "http://h/1k"
    assert ["-H", "Connection: close"] == cmd[cmd.index("-H"):cmd.index("-H") + 2]
    assert "--latency" in cmd and ["-c", "32"] == cmd[3:5]


def test_proc_stat_with_spaces_in_the_name():
    line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 3 0"
    assert parse_proc_stat_cpu_ticks(line) == 325
    own = Path("/proc/self/stat").read_text()
    assert parse_proc_stat_cpu_ticks(own) >= 0
    with pytest.raises(ToolOutputError):
        parse_proc_stat_cpu_ticks("garbage")


def test_status_rss_and_cpu_model():
    assert parse_status_kb("Name:\tx\nVmRSS:\t   45568 kB\nThreads:\t3\n") == 45568
    assert parse_status_kb(Path("/proc/self/status").read_text()) > 0
    with pytest.raises(ToolOutputError):
        parse_status_kb("Name:\tx\n")
    assert parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\n") == "AMD EPYC"


def test_median_and_ratio_skip_what_was_not_measured():
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None


def test_summary_and_report_have_every_metric_and_ratios(tmp_path: Path):
    s = cases.Samples()
    for v in (1.0, 3.0, 2.0):
        s.add("tput_1", "mesh", v)
    s.add("tput_1", "direct", 8.0)
    s.add("tput_1", "stunnel", 4.0)
    s.add("lat_p50", "mesh", 1.2)
    s.add("lat_p50", "direct", 0.2)
    s.add("lat_p50", "stunnel", 0.4)
    cases.derive(s, ["mesh", "direct", "stunnel"])
    mode = cases.MODES["smoke"]
    case = cases.CASES["l4-cross-node"]
    rows = cases.summarize(s, cases.metrics_for(case, mode), ["mesh", "direct", "stunnel"])
    by = {r["key"]: r for r in rows}
    assert by["tput_1"]["values"]["mesh"] == 2.0
    assert by["tput_1"]["ratios"] == {"mesh/direct": 0.25, "mesh/stunnel": 0.5}
    assert by["lat_added_p50"]["values"]["mesh"] == pytest.approx(1.0)
    assert by["lat_added_p50"]["ratios"]["mesh/stunnel"] == pytest.approx(5.0)
    assert by["rps"]["values"]["mesh"] is None  # not measured: shown, not invented
    assert "kb_per_conn_20" in by

    results = {
        "date": "2026-01-01T00:00:00+00:00", "mode": "smoke",
        "settings": {"seconds": 1, "reps": 1, "idle_conns": [20], "concurrency": 32},
        "machine": report.machine(),
        "cases": [
            {"name": case.name, "title": case.title, "status": "ok", "errors": ["x failed"],
             "paths": [{"name": n, "label": n} for n in ("mesh", "direct", "stunnel")],
             "metrics": rows},
            {"name": "l7-gateway", "title": "L7", "status": "not run", "reason": "no gateway"},
        ],
    }
    (tmp_path / "RESULTS.md").write_text(f"old\n{report.KEEP_MARKER}\nmy notes\n")
    md, js = report.write(results, tmp_path)
    text = md.read_text()
    assert "| bulk throughput, 1 stream ↑ | Gbit/s | 2.00 | 8.00 | 4.00 | 0.25× | 0.50× |" \
        in text
    assert "Not run: no gateway" in text and "- x failed" in text
    assert "my notes" in text and "old" not in text.split(report.KEEP_MARKER)[0]
    assert json.loads(js.read_text())["cases"][0]["metrics"][0]["key"] == "rss_idle_src"


def test_lab_file_is_a_valid_lab(tmp_path: Path):
    from nodeproxy.lab.spec import parse_lab

    spec = parse_lab(lab.lab_yaml(tmp_path))
    assert [n.name for n in spec.nodes] == ["node-a", "node-b"]
    res = spec.resources
    labels = {n: d["metadata"].get("labels") or {} for n, d in res.namespaces.items()}
    assert labels == {"mesh": {"nodeproxy.io/dataplane-mode": "ambient"}, "plain": {}}
    nodes = {key: p.node for key, p in res.pods.items()}
    assert nodes == {"mesh/client": "node-a", "mesh/server": "node-b",
                     "plain/client": "node-a", "plain/server": "node-b"}


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_config(tmp_path: Path):
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    (d / "nginx.conf").write_text(lab.nginx_conf(d))
    p = subprocess.run(["nginx", "-t", "-c", str(d / "nginx.conf"), "-e", str(d / "err.log")],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr


def test_stunnel_configs_pin_tls13_and_mutual_auth(tmp_path: Path):
    from benchmarks import pki

    paths = pki.write_stunnel_pki(tmp_path)
    server = lab.stunnel_server_conf(tmp_path, paths)
    client = lab.stunnel_client_conf(tmp_path, paths, "10.244.2.3")
    for conf in (server, client):
        assert conf.count("sslVersionMin = TLSv1.3") == 2
        assert conf.count("verifyChain = yes") == 2
    assert server.count("requireCert = yes") == 2
    assert "connect = 10.244.2.3:18443" in client and "checkHost = server.bench" in client


def test_goals_are_judged_from_the_run_and_unmeasured_ones_say_so():
    def metric(key: str, mesh: float | None, **ratios: float) -> dict[str, object]:
        return {"key": key, "values": {"mesh": mesh},
                "ratios": {k.replace("_", "/"): v for k, v in ratios.items()}}

    case = {"metrics": [
        metric("tput_1", 3.0, mesh_stunnel=1.2),
        metric("lat_added_p50", 0.5, mesh_stunnel=3.0),
        metric("rps_cpu", 0.3),
        metric("fr_vcpu", 0.6),  # both node proxies at 1,000 req/s: 0.3 each
        metric("rss_idle_src", 30.0), metric("rss_idle_dst", 41.0),
        metric("kb_per_conn_1000", 16.0),
    ]}
    got = {goal: (text, ok) for goal, text, ok in report.l4_goals(case)}
    assert [ok for _, ok in got.values()] == [True, False, None, True, False, False, True]
    assert got["the same, measured at a fixed 1,000 req/s (h2load)"] == ("0.3 vCPU", False)
    assert got["≥ 3,000 new tunneled connections/s"] == ("not measured", None)
    assert any("at 1000" in goal for goal in got)


# recorded from h2load (nghttp2 1.52.0, Debian) through the L7 gateway: 32 responses arrived
# after the end of the run and are in the status counts but not in "succeeded"
H2LOAD = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 2s of main \
duration for measurements.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 502.50 req/s, 520.08KB/s
requests: 1005 total, 1037 started, 1005 done, 1005 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 1037 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.02MB (1065127) total, 8.27KB (8472) headers (space savings 95.29%), 1005.00KB \
(1029120) data
                     min         max         mean         sd        +/- sd
time for request:    28.91ms    157.23ms     63.03ms     20.20ms    76.52%
time for connect:       84us       155us       126us        30us    75.00%
time to 1st byte:    64.09ms     65.35ms     65.03ms       626us    75.00%
req/s           :     121.96      127.96      125.59        2.75    75.00%
"""

# nothing listening: h2load still prints its totals, all of them failures
H2LOAD_REFUSED = """\
starting benchmark...
spawning thread #0: 1 total client(s). 10 total requests

finished in 272us, 0.00 req/s, 0B/s
requests: 10 total, 0 started, 0 done, 0 succeeded, 10 failed, 10 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""


def test_h2load_totals():
    res = parse_h2load(H2LOAD)
    assert res.requests_per_second == 502.5
    assert (res.succeeded, res.failed, res.status_2xx) == (1005, 0, 1037)
    assert res.errors == 0  # late responses are not errors
    refused = parse_h2load(H2LOAD_REFUSED)
    assert refused.status_2xx == 0 and refused.errors == 20
    with pytest.raises(ToolOutputError):
        parse_h2load("h2load: invalid option -- 'x'\n")


# recorded from h2load (nghttp2 1.52.0) --log-file: start µs, status, µs to the response's end
H2LOAD_LOG = """\
1796503031087995\t200\t1713
1796503031087982\t200\t8923
1796503031087992\t503\t410
1796503031088992\t200\t240
1796503031089992\t-1\t-1

"""


def test_h2load_log_percentiles_count_only_2xx():
    got = parse_h2load_log(H2LOAD_LOG)
    assert got.latencies_ms == [0.24, 1.713, 8.923] and got.not_2xx == 2
    assert got.percentile(50) == 1.713 and got.percentile(99) == 8.923
    assert got.percentile(1) == 0.24
    assert parse_h2load_log("").percentile(50) is None
    with pytest.raises(ToolOutputError, match="line 2"):
        parse_h2load_log("1\t200\t5\nnot a row\n")


def test_h2load_fixed_rate_command_and_duration():
    assert h2load_rate_cmd("http://10.244.2.2:8080/1k", 3, 16, 1000, "/tmp/x.log") == [
        "h2load", "--h1", "-t", "1", "-c", "16", "-m", "1", "-n", "3008", "--rps", "62.5",
        "--rate", "1", "--rate-period", "1ms", "--log-file", "/tmp/x.log",
        "http://10.244.2.2:8080/1k"]
    assert parse_h2load(H2LOAD).seconds == 2.0
    assert parse_h2load(H2LOAD_REFUSED).seconds == pytest.approx(0.000272)


def test_h2load_command_line():
    assert h2load_cmd("http://10.96.0.2:80/1k", 0.4, 4, 8) == [
        "h2load", "-t", "1", "-c", "4", "-m", "8", "-D", "1", "http://10.96.0.2:80/1k"]


def test_prometheus_sum_over_label_sets():
    text = """\
# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{response_code="200",source_workload="client"} 12.0
istio_requests_total{response_code="503",source_workload="client"} 3
istio_requests_total_created{response_code="200"} 1.7e9
istio_request_bytes_sum 99
"""
    assert prom_sum(text, "istio_requests_total") == 15.0
    assert prom_sum(text, "absent_total") == 0.0


def test_l7_lab_file_adds_the_gateway_namespace_and_haproxy(tmp_path: Path):
    from nodeproxy.lab.spec import parse_lab

    res = parse_lab(lab.lab_yaml(tmp_path, l7=True)).resources
    assert res.namespaces["l7"]["metadata"]["labels"] == {
        "nodeproxy.io/dataplane-mode": "ambient", "nodeproxy.io/l7-gateway": "enabled"}
    assert res.pods["l7/server"].node == "node-b"
    # the C reference runs where the lab puts the namespace's gateway
    assert res.pods["plain/haproxy"].node == lab.L7_GATEWAY_NODE
    assert "plain/haproxy" in res.pods and "l7/web" in res.services
    svc = res.services["l7/web"]
    assert [(p.port, p.target_port) for p in svc.ports] == [(80, lab.NGINX_PORT)]


@pytest.mark.skipif(shutil.which("nginx") is None or shutil.which("haproxy") is None,
                    reason="nginx or haproxy not installed")
def test_nginx_and_haproxy_accept_the_l7_configs(tmp_path: Path):
    from benchmarks import pki

    paths = pki.write_stunnel_pki(tmp_path / "pki")
    paths["client_pem_key"] = tmp_path / "pki" / "combined.pem"
    paths["client_pem_key"].write_bytes(paths["client"].read_bytes()
                                        + paths["client_key"].read_bytes())
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    conf = lab.nginx_conf(d, h2c=True, tls=paths)
    assert "ssl_verify_client on;" in conf and f"listen {lab.NGINX_H2C_PORT} http2" in conf
    (d / "nginx.conf").write_text(conf)
    p = subprocess.run(["nginx", "-t", "-c", str(d / "nginx.conf"), "-e", str(d / "err.log")],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    hap = lab.haproxy_conf(tmp_path, paths, "10.244.2.3")
    assert "nbthread 1" in hap and "verify required" in hap and "proto h2" in hap
    assert f"10.244.2.3:{lab.NGINX_TLS_PORT} ssl" in hap
    (tmp_path / "haproxy.cfg").write_text(hap)
    p = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stdout + p.stderr


def test_l7_rows_split_cpu_by_proxy_and_goals_compare_with_haproxy(tmp_path: Path):
    case = cases.CASES["l7-gateway"]
    keys = [m.key for m in cases.metrics_for(case, cases.MODES["smoke"])]
    for key in ("rss_gw_idle", "rss_gw_20", "kb_per_conn_gw_20", "lat_added_p50", "rps",
                "rps_cpu_gw", "rps_cpu_np", "h2_rps", "h2_cpu_gw", "cps"):
        assert key in keys
    l4_keys = [m.key for m in cases.metrics_for(cases.CASES["l4-cross-node"],
                                                cases.MODES["smoke"])]
    assert not {"rps_cpu_gw", "h2_rps", "rss_gw_idle"} & set(l4_keys)  # L7 rows stay in L7

    run = cases.LoadRun(1000.0, 2000, cases.Cpu({"client": 0.5, "gateway": 2.0,
                                                 "server": 0.5}), {})
    assert run.cpu_per_1k() == 1.5 and run.cpu_per_1k("gateway") == 1.0
    assert run.cpu_per_1k("client", "server") == 0.5
    assert cases.LoadRun(1.0, 10, cases.Cpu({}), {}).cpu_per_1k() is None  # no proxy

    s = cases.Samples()
    for path, p50, rps in (("mesh", 1.5, 3000.0), ("direct", 0.1, 20000.0),
                           ("haproxy", 0.3, 5000.0)):
        s.add("lat_p50", path, p50)
        s.add("rps", path, rps)
    names = ["mesh", "direct", "haproxy"]
    cases.derive(s, names)
    rows = cases.summarize(s, cases.metrics_for(case, cases.MODES["smoke"]), names)
    entry = {"name": case.name, "title": case.title, "status": "ok", "errors": [],
             "paths": [{"name": n, "label": n} for n in names], "metrics": rows}
    got = {goal: (text, ok) for goal, text, ok in report.l7_goals(entry)}
    assert list(got.values()) == [("0.60×", True), ("1.40 ms", False)]
    results = {"date": "2026-01-01T00:00:00+00:00", "mode": "smoke",
               "settings": {"seconds": 1, "reps": 1, "idle_conns": [20], "concurrency": 32},
               "machine": report.machine(), "cases": [entry]}
    md, _ = report.write(results, tmp_path)
    text = md.read_text()
    assert "| requests/s, 32 connections ↑ | req/s | 3,000 | 20,000 | 5,000 | 0.15× | 0.60× |" \
        in text
    assert "haproxy's requests/s on one core" in text and "mTLS" in text
