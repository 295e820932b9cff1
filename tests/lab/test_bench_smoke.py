"""`python -m benchmarks.run --smoke` runs end to end in its own lab and writes its report.

No timing is asserted: the figures only have to be there and be numbers (since the L7 gateway
exists, the `l7-gateway` case runs too: through the gateway, direct, and through haproxy), with
the growth tables drawn from them (memory by connections and by enrolled pods, CPU per byte by
streams).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
LAB_DIR = "/run/nodeproxy-bench-smoke"
PREFIX = "npbs-"


def _down(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nodeproxy.cli", "lab", "down"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


PROXY_METRICS = ("rss_", "kb_per_conn", "rps_cpu", "cps_cpu", "h2_cpu", "fr_vcpu")


def _no_such_proxy(key: str, path: str) -> bool:
    """Rows that weigh a proxy the path does not have: none on the direct path, haproxy has
    no node proxies, and only the mesh path has a node proxy that enrolls pods."""
    if key.startswith("pods_"):
        return path != "mesh"
    if path == "direct":
        return key.startswith(PROXY_METRICS) or re.fullmatch(r"tput_\d+_cpu", key) is not None
    return path == "haproxy" and key == "rps_cpu_np"


def test_bench_smoke_writes_every_case_with_numbers(tmp_path: Path):
    assert os.geteuid() == 0, "the benchmark lab needs root"
    env = {**os.environ, "NODEPROXY_LAB_DIR": LAB_DIR, "NODEPROXY_LAB_PREFIX": PREFIX}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path),
             "--lab-dir", LAB_DIR, "--prefix", PREFIX],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=150,
        )
    finally:
        down = _down(env)  # the harness takes its lab down itself; this is the safety net
    assert down.returncode == 0, down.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert PREFIX not in left
    detail = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    md, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    assert md.exists() and js.exists(), detail
    results = json.loads(js.read_text())
    assert results["mode"] == "smoke"
    assert {"nproc", "cpu_model", "kernel", "python"} <= set(results["machine"])
    by_name = {c["name"]: c for c in results["cases"]}
    assert set(by_name) == set(cases.CASES), detail
    assert by_name["l7-gateway"]["status"] == "ok", by_name["l7-gateway"].get("reason", detail)
    text = md.read_text()
    for name, case in by_name.items():
        assert f"`{name}`" in text
        if cases.CASES[name].unavailable() is not None:
            assert case["status"] == "not run" and case["reason"]
            continue
        assert case["status"] == "ok", case.get("reason", detail)
        assert not case["errors"], case["errors"]
        paths = [p["name"] for p in case["paths"]]
        assert paths[0] == "mesh" and len(paths) >= 2
        for metric in case["metrics"]:
            assert metric["title"] in text
            for path, value in metric["values"].items():
                if _no_such_proxy(metric["key"], path):
                    assert value is None, (metric["key"], path, value)
                else:
                    assert isinstance(value, int | float), (metric["key"], path, value)
            for name_, r in metric["ratios"].items():
                assert r is None or isinstance(r, int | float), name_
    _check_growth(by_name, text)
    assert proc.returncode == 0, detail


def _check_growth(by_name: dict[str, dict], text: str) -> None:
    """Every growth table is in the JSON and the Markdown, each row with a measured figure."""
    expected = {"l4-cross-node": {"memory_by_connections", "cpu_by_streams", "memory_by_pods"},
                "l7-gateway": {"gateway_memory_by_connections"}}
    for name, keys in expected.items():
        growth = {g["key"]: g for g in by_name[name]["growth"]}
        assert set(growth) == keys, (name, list(growth))
        for g in growth.values():
            assert f"{g['title']}:" in text
            assert len(g["rows"]) >= 2, g
            for row in g["rows"]:
                assert any(isinstance(v, int | float) for v in row["values"]), (g["key"], row)
    streams = by_name["l4-cross-node"]["growth"]
    by_streams = next(g for g in streams if g["key"] == "cpu_by_streams")
    assert [r["x"] for r in by_streams["rows"]] == [1, 8, 32]
    pods = next(g for g in streams if g["key"] == "memory_by_pods")
    assert [r["x"] for r in pods["rows"]] == [0, *cases.MODES["smoke"].extra_pods]
