"""The benchmark's growth figures: memory by connections and pods, CPU per byte by streams.

Pure parts only (the rows a mode asks for, the idle pods' documents, the growth tables of the
report); the lab run itself is covered by tests/lab/test_bench_smoke.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import cases, report

L4 = cases.CASES["l4-cross-node"]
PATHS = ["mesh", "direct", "stunnel"]


def _entry(case: cases.Case, mode: cases.Mode, s: cases.Samples, names: list[str]
           ) -> dict[str, object]:
    rows = cases.summarize(s, cases.metrics_for(case, mode), names)
    return {"name": case.name, "title": case.title, "status": "ok", "errors": [], "notes": [],
            "paths": [{"name": n, "label": n} for n in names], "metrics": rows}


def _results(*entries: dict[str, object]) -> dict[str, object]:
    return {"date": "2026-01-01T00:00:00+00:00", "mode": "quick",
            "settings": {"seconds": 3, "reps": 1, "idle_conns": [100], "concurrency": 32},
            "machine": report.machine(), "cases": list(entries)}


def test_every_mode_measures_cpu_per_byte_at_1_8_32_streams_and_pods_in_steps():
    for name, mode in cases.MODES.items():
        keys = [m.key for m in cases.metrics_for(L4, mode)]
        for n in (1, 8, 32):
            assert f"tput_{n}" in keys and f"tput_{n}_cpu" in keys, name
        assert mode.extra_pods and list(mode.extra_pods) == sorted(set(mode.extra_pods))
        assert "pods_rss_0" in keys
        for n in mode.extra_pods:
            assert {f"pods_rss_{n}", f"pods_kb_{n}", f"pods_cpu_{n}"} <= set(keys), name
    assert cases.MODES["full"].extra_pods == (20, 100)
    # memory first: its idle figure comes before anything grows the heaps
    assert L4.figures[:2] == ("memory", "pod-memory")
    assert {"pod-memory", "throughput-32"} <= set(cases.FIGURES)


def test_figure_selection_keeps_only_the_chosen_rows():
    import dataclasses

    only = dataclasses.replace(L4, figures=("throughput-32",))
    assert [m.key for m in cases.metrics_for(only, cases.MODES["quick"])] == \
        ["tput_32", "tput_32_cpu"]
    only = dataclasses.replace(L4, figures=("pod-memory",))
    assert [m.key for m in cases.metrics_for(only, cases.MODES["quick"])] == \
        ["pods_rss_0", "pods_rss_20", "pods_kb_20", "pods_cpu_20"]


def test_idle_pods_are_sleeping_pods_on_one_node_continuing_the_numbering():
    from nodeproxy.lab.spec import load_documents, parse_resources

    text = cases.idle_pods_yaml("mesh", "node-a", 20, 23)
    res = parse_resources(load_documents(text, "idle.yaml"), "idle.yaml")
    assert sorted(res.pods) == ["mesh/idle-20", "mesh/idle-21", "mesh/idle-22"]
    for pod in res.pods.values():
        assert pod.node == "node-a" and pod.command == ["sleep", "infinity"]
    assert cases.idle_pods_yaml("mesh", "node-a", 5, 5) == ""


def test_only_the_mesh_path_gets_pods_added():
    class NoLab:  # the figure must return before touching the lab on the other paths
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"lab.{name} used")

    s = cases.Samples()
    for name in ("direct", "stunnel"):
        path = cases.Path(name, name, "plain/client", "10.0.0.1", 80, "10.0.0.1", 5201)
        cases.fig_pod_memory(NoLab(), path, cases.MODES["smoke"], s)  # type: ignore[arg-type]
    assert s.values == {} and not s.errors


def _l4_samples() -> cases.Samples:
    s = cases.Samples()
    # memory by idle connections: idle, then 100 held (client side, server side)
    for path, idle, held, kb in (("mesh", 33.0, 34.5, 30.7), ("stunnel", 10.0, 20.0, 204.8)):
        s.add("rss_idle_src", path, idle)
        s.add("rss_idle_dst", path, idle)
        s.add("rss_100_src", path, held)
        s.add("rss_100_dst", path, held)
        s.add("kb_per_conn_100", path, kb)
    # CPU per GB at 1, 8, 32 streams
    for n, mesh_cpu, stunnel_cpu in ((1, 6.0, 5.0), (8, 5.0, 4.0), (32, 4.5, 3.0)):
        s.add(f"tput_{n}", "mesh", 2.0)
        s.add(f"tput_{n}", "direct", 10.0)
        s.add(f"tput_{n}", "stunnel", 2.5)
        s.add(f"tput_{n}_cpu", "mesh", mesh_cpu)
        s.add(f"tput_{n}_cpu", "direct", None)
        s.add(f"tput_{n}_cpu", "stunnel", stunnel_cpu)
    s.add("pods_rss_0", "mesh", 33.0)
    s.add("pods_rss_20", "mesh", 33.5)
    s.add("pods_kb_20", "mesh", 25.6)
    s.add("pods_cpu_20", "mesh", 4.0)
    return s


def test_growth_tables_in_the_report_and_the_json(tmp_path: Path):
    entry = _entry(L4, cases.MODES["quick"], _l4_samples(), PATHS)
    series = {g["key"]: g for g in report.growth(entry)}
    assert set(series) == {"memory_by_connections", "cpu_by_streams", "memory_by_pods"}

    mem = series["memory_by_connections"]
    assert [r["x"] for r in mem["rows"]] == [0, 100]
    titles = [c["title"] for c in mem["columns"]]
    assert titles == ["mesh RSS, both sides", "mesh per connection, both sides",
                      "stunnel RSS, both sides", "stunnel per connection, both sides",
                      "mesh/stunnel per connection"]  # direct has no proxy: no column
    assert mem["rows"][0]["values"] == [66.0, None, 20.0, None, None]
    assert mem["rows"][1]["values"][:4] == [69.0, 30.7, 40.0, 204.8]
    assert mem["rows"][1]["values"][4] == 30.7 / 204.8

    cpu = series["cpu_by_streams"]
    assert [r["x"] for r in cpu["rows"]] == [1, 8, 32]
    titles = [c["title"] for c in cpu["columns"]]
    assert "direct throughput" in titles and "direct proxy CPU per GB" not in titles
    ratio_col = titles.index("mesh/stunnel CPU per GB")
    assert [r["values"][ratio_col] for r in cpu["rows"]] == [6.0 / 5.0, 5.0 / 4.0, 1.5]

    pods = series["memory_by_pods"]
    assert [(r["label"], r["values"]) for r in pods["rows"]] == [
        ("0", [33.0, None, None]), ("+20", [33.5, 25.6, 4.0])]

    md, js = report.write(_results(entry), tmp_path)
    text = md.read_text()
    assert "Proxy memory by idle connections held (client + server side):" in text
    assert "| 0 (idle) | 66.0 | — | 20.0 | — | — |" in text
    assert "| 100 | 69.0 | 30.7 | 40.0 | 205 | 0.15× |" in text
    assert "| 32 | 2.00 | 4.50 | 10.0 | 2.50 | 3.00 | 1.50× |" in text
    assert "| +20 | 33.5 | 25.6 | 4.00 |" in text
    assert text.index("Goals of issue 4") < text.index("by parallel streams")
    saved = json.loads(js.read_text())["cases"][0]
    assert [g["key"] for g in saved["growth"]] == [g["key"] for g in report.growth(entry)]
    assert saved["metrics"] == entry["metrics"]  # the rows themselves are untouched


def test_growth_of_the_l7_gateway_and_of_partial_runs():
    case = cases.CASES["l7-gateway"]
    s = cases.Samples()
    for path, idle, held in (("mesh", 40.0, 42.0), ("haproxy", 15.0, 20.0)):
        s.add("rss_gw_idle", path, idle)
        s.add("rss_gw_20", path, held)
        s.add("kb_per_conn_gw_20", path, (held - idle) * 1024 / 20)
    names = ["mesh", "direct", "haproxy"]
    series = report.growth(_entry(case, cases.MODES["smoke"], s, names))
    assert [g["key"] for g in series] == ["gateway_memory_by_connections"]
    assert series[0]["rows"][1]["values"] == [42.0, 102.4, 20.0, 256.0, 0.4]

    # nothing measured (figures not chosen, or failed): no empty tables
    assert report.growth(_entry(L4, cases.MODES["quick"], cases.Samples(), PATHS)) == []
    assert report.growth({"name": "x", "status": "not run", "reason": "r"}) == []
    # one side missing: no invented sum
    s = cases.Samples()
    s.add("rss_idle_src", "mesh", 33.0)
    s.add("rss_100_src", "mesh", 34.0)
    s.add("rss_100_dst", "mesh", 34.0)
    mem = report.growth(_entry(L4, cases.MODES["quick"], s, PATHS))[0]
    assert mem["rows"][0]["values"][0] is None and mem["rows"][1]["values"][0] == 68.0
