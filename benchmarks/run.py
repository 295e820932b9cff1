"""`python -m benchmarks.run [--smoke|--quick|--full] [--cases …] [--figures …] [--out DIR]`.

Brings up the benchmark lab, measures every chosen case on its paths, writes RESULTS.md and
results.json, and always takes the lab down again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import cases, report
from benchmarks.lab import BenchLab, BenchLabError

log = logging.getLogger("benchmarks.run")
HERE = Path(__file__).resolve().parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    m = p.add_mutually_exclusive_group()
    for name, mode in cases.MODES.items():
        m.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                       help=f"{mode.seconds:g} s per run, {mode.reps} repetition(s), "
                            f"{'/'.join(map(str, mode.idle_conns))} idle connections")
    p.set_defaults(mode="full")
    p.add_argument("--cases", help=f"comma-separated, of: {', '.join(cases.CASES)}")
    p.add_argument("--figures", help=f"comma-separated, of: {', '.join(cases.FIGURES)}")
    p.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and results.json go")
    p.add_argument("--lab-dir", type=Path,
                   default=Path(os.environ.get("BENCH_LAB_DIR", "/run/nodeproxy-bench")))
    p.add_argument("--prefix", default=os.environ.get("BENCH_LAB_PREFIX", "npb-"))
    p.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    p.add_argument("--workers", type=int, default=1,
                   help="node proxy worker processes per node (nodeproxy ztunnel --workers)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _pick(arg: str | None, known: dict[str, Any], what: str) -> list[str]:
    if not arg:
        return list(known)
    chosen = [x.strip() for x in arg.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def _terminate(signum: int, frame: object) -> None:
    # turn SIGTERM into an exception so that the lab is taken down by the finally below
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    mode = cases.MODES[args.mode]
    case_names = _pick(args.cases, cases.CASES, "cases")
    figures = _pick(args.figures, cases.FIGURES, "figures")
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": report.now(),
        "mode": mode.name,
        "settings": {"seconds": mode.seconds, "reps": mode.reps,
                     "idle_conns": list(mode.idle_conns), "concurrency": mode.concurrency,
                     "node_proxy_workers": args.workers},
        "machine": report.machine(),
        "cases": [],
    }
    runnable = []
    for name in case_names:
        case = cases.CASES[name]
        reason = case.unavailable()
        if reason:
            log.warning("case %s not run: %s", name, reason)
            results["cases"].append({"name": name, "title": case.title, "status": "not run",
                                     "reason": reason})
        else:
            runnable.append(case)

    failed = False
    if runnable:
        # the pods serve files from here: it lives as long as the lab (kept with --keep)
        workdir = Path(tempfile.mkdtemp(prefix="nodeproxy-bench-"))
        # the L7 case's namespace, gateway and haproxy only when it runs
        lab = BenchLab(args.lab_dir, args.prefix, workdir,
                       l7=any(c.name == "l7-gateway" for c in runnable), workers=args.workers)
        try:
            t0 = time.monotonic()
            try:
                lab.up()
            except (BenchLabError, OSError, subprocess.SubprocessError) as e:
                log.error("the benchmark lab did not come up: %s", e)
                failed = True
                results["cases"] += [{"name": c.name, "title": c.title, "status": "failed",
                                      "reason": f"lab up failed: {e}"} for c in runnable]
                runnable = []
            log.info("lab up in %.1f s", time.monotonic() - t0)
            for case in runnable:
                entry = _measure(lab, case, mode, figures)
                failed |= bool(entry.get("errors")) or entry["status"] != "ok"
                results["cases"].append(entry)
        finally:
            if not args.keep:
                down = lab.down()
                if down.returncode != 0:
                    log.error("lab down failed: %s", down.stderr.strip())
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                log.warning("lab kept (files in %s): NODEPROXY_LAB_DIR=%s "
                            "NODEPROXY_LAB_PREFIX=%s", workdir, args.lab_dir, args.prefix)
    # keep the order the cases were asked for
    order = {n: i for i, n in enumerate(case_names)}
    results["cases"].sort(key=lambda c: order[c["name"]])
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    md, js = report.write(results, args.out)
    print(md.read_text().split(report.KEEP_MARKER)[0])
    print(f"wrote {md} and {js} in {results['elapsed_s']} s")
    return 1 if failed else 0


def _measure(lab: BenchLab, case: cases.Case, mode: cases.Mode, figures: list[str]
             ) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": case.name, "title": case.title}
    try:
        paths = case.paths(lab)
        samples = cases.measure_case(lab, case, mode, figures)
    except Exception as e:  # a broken case is reported; the other cases still run
        log.exception("case %s failed", case.name)
        return {**entry, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    chosen = dataclasses.replace(case, figures=tuple(f for f in case.figures if f in figures))
    names = [p.name for p in paths]
    return {
        **entry,
        "status": "ok",
        "paths": [{"name": p.name, "label": p.label} for p in paths],
        "metrics": cases.summarize(samples, cases.metrics_for(chosen, mode), names),
        "errors": samples.errors,
        "notes": samples.notes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("benchmarks need root (the lab makes network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; the lab was taken down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
