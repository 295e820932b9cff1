"""`python -m benchmarks.run --smoke` runs end to end in its own lab and writes its report.

No timing is asserted: the figures only have to be there and be numbers (since the L7 gateway
exists, the `l7-gateway` case runs too: through the gateway, direct, and through haproxy).
"""

from __future__ import annotations

import json
import os
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


PROXY_METRICS = ("rss_", "kb_per_conn", "tput_1_cpu", "rps_cpu", "cps_cpu", "h2_cpu")


def _no_such_proxy(key: str, path: str) -> bool:
    """Rows that weigh a proxy the path does not have: none on the direct path, and haproxy
    has no node proxies."""
    if path == "direct":
        return key.startswith(PROXY_METRICS)
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
    assert proc.returncode == 0, detail
