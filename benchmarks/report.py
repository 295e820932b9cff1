"""The machine description, and the results as JSON and as a Markdown table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cases import FIXED_RATE
from benchmarks.tools import parse_cpu_model

# RESULTS.md keeps whatever a person wrote below this line (notes, before/after history)
KEEP_MARKER = "<!-- notes below are kept when the report is regenerated -->"


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    text = (p.stdout + p.stderr).strip().splitlines()
    lines = [line for line in text if line and "inetd" not in line]
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": parse_cpu_model(cpuinfo),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": commit or "unknown",
        "tools": {
            "iperf3": _version(["iperf3", "--version"]),
            "wrk": _version(["wrk", "-v"]),
            "stunnel": _version(["stunnel4", "-version"]),
            "nginx": _version(["nginx", "-v"]),
            "haproxy": _version(["haproxy", "-v"]),
            "h2load": _version(["h2load", "--version"]),
        },
    }


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# -- formatting -------------------------------------------------------------------------------


def fmt_value(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def case_table(case: dict[str, Any]) -> list[str]:
    paths = [p["name"] for p in case["paths"]]
    subject, baselines = paths[0], paths[1:]
    head = ["figure", "unit", *paths, *[f"{subject}/{b}" for b in baselines]]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for m in case["metrics"]:
        arrow = "↑" if m["better"] == "higher" else "↓"
        cells = [f"{m['title']} {arrow}", m["unit"]]
        cells += [fmt_value(m["values"].get(p)) for p in paths]
        cells += [fmt_ratio(m["ratios"].get(f"{subject}/{b}")) for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _value(case: dict[str, Any], key: str, path: str = "mesh") -> float | None:
    for m in case.get("metrics", []):
        if m["key"] == key:
            return m["values"].get(path)
    return None


def _ratio(case: dict[str, Any], key: str, name: str) -> float | None:
    for m in case.get("metrics", []):
        if m["key"] == key:
            return m["ratios"].get(name)
    return None


def l4_goals(case: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's L4 goals: (goal, what this run measured, met?); None: not measured."""
    def check(v: float | None, ok: bool | None, text: str) -> tuple[str, bool | None]:
        return ("not measured", None) if v is None else (text, ok)

    out: list[tuple[str, str, bool | None]] = []
    r = _ratio(case, "tput_1", "mesh/stunnel")
    out.append(("bulk throughput ≥ 1.0× the stunnel pair (1 stream)",
                *check(r, r is not None and r >= 1.0, fmt_ratio(r))))
    r = _ratio(case, "lat_added_p50", "mesh/stunnel")
    out.append(("added p50 latency over direct ≤ 2× the stunnel pair's",
                *check(r, r is not None and r <= 2.0, fmt_ratio(r))))
    v = _value(case, "cps")
    out.append(("≥ 3,000 new tunneled connections/s",
                *check(v, v is not None and v >= 3000, f"{fmt_value(v)} conn/s")))
    v = _value(case, "rps_cpu")
    per_proxy = v / 2 if v is not None else None
    out.append(("≤ 0.25 vCPU per 1,000 req/s per node proxy (mean of the two)",
                *check(per_proxy, per_proxy is not None and per_proxy <= 0.25,
                       f"{fmt_value(per_proxy)} vCPU")))
    v = _value(case, "fr_vcpu")
    at_rate = v / 2 * 1000 / FIXED_RATE if v is not None else None
    out.append((f"the same, measured at a fixed {FIXED_RATE:,} req/s (h2load)",
                *check(at_rate, at_rate is not None and at_rate <= 0.25,
                       f"{fmt_value(at_rate)} vCPU")))
    idle = [x for x in (_value(case, "rss_idle_src"), _value(case, "rss_idle_dst"))
            if x is not None]
    worst = max(idle) if idle else None
    out.append(("≤ 40 MB resident idle per node proxy",
                *check(worst, worst is not None and worst <= 40, f"{fmt_value(worst)} MB")))
    per_conn = [m for m in case.get("metrics", []) if m["key"].startswith("kb_per_conn_")]
    if per_conn:
        m = per_conn[-1]  # the most connections measured
        v = m["values"].get("mesh")
        half = v / 2 if v is not None else None
        out.append((f"≤ 10 KB per open idle connection per node proxy (at "
                    f"{m['key'].rsplit('_', 1)[1]})",
                    *check(half, half is not None and half <= 10, f"{fmt_value(half)} KB")))
    return out


def l7_goals(case: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's L7 goals: the gateway against haproxy, both on one core."""
    out: list[tuple[str, str, bool | None]] = []
    r = _ratio(case, "rps", "mesh/haproxy")
    out.append(("L7 gateway ≥ 0.5× haproxy's requests/s on one core (HTTP/1.1, 32 conns)",
                fmt_ratio(r) if r is not None else "not measured",
                None if r is None else r >= 0.5))
    v = _value(case, "lat_added_p50")
    out.append(("added p50 latency over direct ≤ 1 ms",
                f"{fmt_value(v)} ms" if v is not None else "not measured",
                None if v is None else v <= 1.0))
    return out


GOALS = {"l4-cross-node": l4_goals, "l7-gateway": l7_goals}

# what the proxy rows of each case count
ABOUT = {
    "l7-gateway": (
        "Proxy CPU counts every proxy of the path: on the mesh path the gateway and the two "
        "node proxies (client side, server side), on the haproxy path haproxy; the "
        "\"gateway / haproxy\" rows count only the proxy in the middle. Both run on one core "
        "(the gateway is one process, haproxy has `nbthread 1`). haproxy's leg to nginx is "
        "TLS 1.3 with client certificates (mTLS); the client's leg to haproxy is plain HTTP, "
        "where the mesh encrypts both hops (node proxy → gateway → node proxy)."
    ),
}


def goals_section(case: dict[str, Any]) -> list[str]:
    lines = ["", "Goals of issue 4 for this case:", "", "| goal | this run | met |",
             "|---|---:|:---:|"]
    for goal, got, ok in GOALS[case["name"]](case):
        lines.append(f"| {goal} | {got} | {'—' if ok is None else ('yes' if ok else 'no')} |")
    return lines


# -- growth series: how memory and CPU per byte grow with connections, streams and pods -------

Value = float | None


def _metric_values(case: dict[str, Any]) -> dict[str, dict[str, Value]]:
    return {m["key"]: m["values"] for m in case.get("metrics", [])}


def _points(keys: list[str], pattern: str) -> list[int]:
    """The numbers N of the keys that match `pattern` (one group: N), in order."""
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return sorted(found)


def _sum(*values: Value) -> Value:
    """The sum when every part was measured, else None (half a figure would mislead)."""
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


Column = tuple[str, str, Callable[[int], Value]]  # title, unit, value at a point


def _series(key: str, title: str, x_title: str, points: list[tuple[int, str]],
            columns: list[Column]) -> dict[str, Any] | None:
    """A growth table: one row per point, one column per figure; columns that have no value
    at any point are left out, and a series with fewer than two rows is not one."""
    kept = [(t, u, [f(x) for x, _ in points]) for t, u, f in columns]
    kept = [c for c in kept if any(v is not None for v in c[2])]
    if len(points) < 2 or not kept:
        return None
    return {
        "key": key, "title": title, "x": x_title,
        "columns": [{"title": t, "unit": u} for t, u, _ in kept],
        "rows": [{"x": x, "label": label, "values": [c[2][i] for c in kept]}
                 for i, (x, label) in enumerate(points)],
    }


def _with_ratios(columns: list[Column], subject: str, baselines: list[str], what: str,
                 fn: Callable[[str, int], Value]) -> list[Column]:
    """`columns` plus the subject's figure divided by each baseline's."""
    out = list(columns)
    for b in baselines:
        out.append((f"{subject}/{b} {what}", "×",
                    lambda x, b=b: ratio_of(fn(subject, x), fn(b, x))))
    return out


def ratio_of(a: Value, b: Value) -> Value:
    return None if a is None or b is None or b == 0 else a / b


def growth(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The case's growth series, from its metric rows (so older results.json work too)."""
    if case.get("status") != "ok":
        return []
    vals = _metric_values(case)
    keys = list(vals)
    paths = [p["name"] for p in case.get("paths", [])]
    subject, baselines = (paths[0], paths[1:]) if paths else ("mesh", [])

    def v(key: str, path: str) -> Value:
        return vals.get(key, {}).get(path)

    out: list[dict[str, Any] | None] = []

    # memory by idle connections: the two node proxies (or stunnel processes)
    conns = _points(keys, r"rss_(\d+)_src")
    if conns:
        weighed = [p for p in paths if v("rss_idle_src", p) is not None
                   or any(v(f"rss_{n}_src", p) is not None for n in conns)]

        def mb(path: str, n: int) -> Value:
            if n == 0:
                return _sum(v("rss_idle_src", path), v("rss_idle_dst", path))
            return _sum(v(f"rss_{n}_src", path), v(f"rss_{n}_dst", path))

        def kb(path: str, n: int) -> Value:
            return v(f"kb_per_conn_{n}", path) if n else None

        cols: list[Column] = []
        for p in weighed:
            cols += [(f"{p} RSS, both sides", "MB", lambda n, p=p: mb(p, n)),
                     (f"{p} per connection, both sides", "KB", lambda n, p=p: kb(p, n))]
        if subject in weighed:
            cols = _with_ratios(cols, subject, [b for b in baselines if b in weighed],
                                "per connection", kb)
        out.append(_series("memory_by_connections",
                           "Proxy memory by idle connections held (client + server side)",
                           "idle connections",
                           [(0, "0 (idle)")] + [(n, f"{n:,}") for n in conns], cols))

    # memory by idle connections through the proxy in the middle (L7)
    gw_conns = _points(keys, r"rss_gw_(\d+)")
    if gw_conns:
        weighed = [p for p in paths if v("rss_gw_idle", p) is not None
                   or any(v(f"rss_gw_{n}", p) is not None for n in gw_conns)]

        def gw_mb(path: str, n: int) -> Value:
            return v("rss_gw_idle" if n == 0 else f"rss_gw_{n}", path)

        def gw_kb(path: str, n: int) -> Value:
            return v(f"kb_per_conn_gw_{n}", path) if n else None

        cols = []
        for p in weighed:
            cols += [(f"{p} RSS", "MB", lambda n, p=p: gw_mb(p, n)),
                     (f"{p} per connection", "KB", lambda n, p=p: gw_kb(p, n))]
        if subject in weighed:
            cols = _with_ratios(cols, subject, [b for b in baselines if b in weighed],
                                "per connection", gw_kb)
        out.append(_series("gateway_memory_by_connections",
                           "Gateway / haproxy memory by idle connections held",
                           "idle connections",
                           [(0, "0 (idle)")] + [(n, f"{n:,}") for n in gw_conns], cols))

    # CPU per byte by parallel streams
    streams = _points(keys, r"tput_(\d+)")
    if streams:
        def cpu(path: str, n: int) -> Value:
            return v(f"tput_{n}_cpu", path)

        cols = []
        for p in paths:
            cols += [(f"{p} throughput", "Gbit/s", lambda n, p=p: v(f"tput_{n}", p)),
                     (f"{p} proxy CPU per GB", "CPU s/GB", lambda n, p=p: cpu(p, n))]
        with_cpu = [b for b in baselines if any(cpu(b, n) is not None for n in streams)]
        cols = _with_ratios(cols, subject, with_cpu, "CPU per GB", cpu)
        out.append(_series("cpu_by_streams", "Proxy CPU per GB by parallel streams (iperf3)",
                           "streams", [(n, f"{n:,}") for n in streams], cols))

    # node proxy memory by enrolled pods (the subject only: baselines have no node proxy)
    pods = _points(keys, r"pods_rss_(\d+)")
    if pods and pods[0] == 0:
        cols = [("RSS", "MB", lambda n: v(f"pods_rss_{n}", subject)),
                ("per enrolled pod", "KB", lambda n: v(f"pods_kb_{n}", subject) if n else None),
                ("CPU per pod enrolled", "ms",
                 lambda n: v(f"pods_cpu_{n}", subject) if n else None)]
        out.append(_series("memory_by_pods",
                           f"{subject} node proxy memory by idle pods enrolled on its node "
                           "(restarted first; the node's own pods at 0)",
                           "pods added", [(n, f"+{n:,}" if n else "0") for n in pods], cols))
    return [s for s in out if s is not None]


def growth_section(series: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for s in series:
        head = [s["x"], *[f"{c['title']} ({c['unit']})" for c in s["columns"]]]
        lines += ["", f"{s['title']}:", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---:"] * len(head)) + "|"]
        for row in s["rows"]:
            cells = [row["label"]]
            for c, value in zip(s["columns"], row["values"], strict=True):
                cells.append(fmt_ratio(value) if c["unit"] == "×" else fmt_value(value))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    mc = results["machine"]
    out = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks.run --{results['mode']}` (`make bench` runs "
        f"`--full`) on {results['date']}; all figures from this one run, on this machine, "
        f"in {results.get('elapsed_s', '?')} s.",
        "",
        f"- machine: {mc['nproc']} CPUs ({mc['cpu_model']}), kernel {mc['kernel']}, "
        f"Python {mc['python']}, load average at start {mc['load_average']}",
        f"- commit: {mc['commit']}; tools: " + ", ".join(
            f"{v}" for v in mc["tools"].values()),
        f"- mode `{results['mode']}`: {results['settings']['seconds']:g} s per run, "
        f"median of {results['settings']['reps']} repetition(s), paths interleaved; "
        f"idle connections held: {', '.join(map(str, results['settings']['idle_conns']))}; "
        f"node proxy worker processes: {results['settings'].get('node_proxy_workers', 1)}",
        "- ↑ higher is better, ↓ lower is better. Ratios are the mesh's figure divided by the "
        "baseline's. Unless a case says otherwise, proxy CPU and memory count the two node "
        "proxies of the path (client side on node-a, server side on node-b), or the two "
        "stunnel processes; the direct path has none.",
        "",
    ]
    for case in results["cases"]:
        out.append(f"## {case['title']} (`{case['name']}`)")
        out.append("")
        if case["status"] != "ok":
            out += [f"Not run: {case['reason']}", ""]
            continue
        out += [", ".join(f"**{p['name']}**: {p['label']}" for p in case["paths"]), ""]
        if case["name"] in ABOUT:
            out += [ABOUT[case["name"]], ""]
        out += case_table(case)
        if case["name"] in GOALS:
            out += goals_section(case)
        out += growth_section(growth(case))
        if case.get("notes"):
            out += ["", "Notes:", ""]
            out += [f"- {n}" for n in case["notes"]]
        if case.get("errors"):
            out += ["", "Errors during the run:", ""]
            out += [f"- {e}" for e in case["errors"]]
        out.append("")
    return "\n".join(out) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """RESULTS.md and results.json in `out_dir`; notes below KEEP_MARKER survive."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "RESULTS.md", out_dir / "results.json"
    kept = ""
    if md_path.exists():
        old = md_path.read_text()
        if KEEP_MARKER in old:
            kept = old.split(KEEP_MARKER, 1)[1]
    md_path.write_text(markdown(results) + "\n" + KEEP_MARKER + (kept or "\n"))
    # the growth series beside the rows they are drawn from
    out = {**results, "cases": [{**c, "growth": growth(c)} if c.get("status") == "ok" else c
                                for c in results.get("cases", [])]}
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    return md_path, json_path
