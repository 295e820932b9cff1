"""In-process micro-benchmark of the L4 data path: CPU time per tunnelled connection/request.

Both node proxy ends run in this process (an "outbound" listener that opens a pooled HBONE
stream per accepted TCP connection, and an HBONE server over real TLS on loopback that dials the
app and relays, each with metrics and an access log line like ``ztunnel/outbound.py`` and
``ztunnel/inbound.py``); the load generator and the app run in a subprocess, so
``time.process_time()`` of this process is the two proxies' CPU. Load from other processes
barely moves it, unlike wall-clock figures.

    python -m benchmarks.l4_micro conn      # new connections: 78 B up, 1,200 B back, close
    python -m benchmarks.l4_micro latency   # one connection, 1 KB ping-pong (CPU and p50)
    python -m benchmarks.l4_micro rps -c 32 # 32 connections, 1 KB ping-pong each (CPU per op)
    python -m benchmarks.l4_micro latency -c 8  # the same with 8 idle connections (streams) open
    python -m benchmarks.l4_micro paced -c 16  # 1,000 req/s in all, spread (the fixed-rate figure)
    python -m benchmarks.l4_micro idle      # memory per open idle connection (95: one HBONE conn)
    python -m benchmarks.l4_micro bulk      # 256 MiB one way over one connection

For ``idle``, ``L4_MICRO_TOP=1`` lists the largest allocations per connection (tracemalloc),
grouped by line, or by file with ``L4_MICRO_TOP_BY=filename``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

REQUEST = b"G" * 78
RESPONSE = b"R" * 1200


class _StepCounter(trio.abc.Instrument):
    """Counts trio task steps (each one a task switch) in the proxies."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


# -- the load generator and app (subprocess) ------------------------------------------------


async def _app_conn(stream: trio.SocketStream) -> None:
    mode = _LOADGEN_MODE
    try:
        if mode == "conn":
            got = 0
            while got < len(REQUEST):
                data = await stream.receive_some()
                if not data:
                    return
                got += len(data)
            await stream.send_all(RESPONSE)
            await stream.aclose()
        else:  # echo
            while data := await stream.receive_some(1 << 20):
                if mode == "bulk":
                    continue
                await stream.send_all(data)
            if mode == "bulk":
                await stream.send_all(b"done")
            await stream.aclose()
    except trio.BrokenResourceError:
        pass


_LOADGEN_MODE = "conn"
PACED_RATE = 1000  # requests a second of the paced mode


async def _loadgen(mode: str) -> None:
    global _LOADGEN_MODE
    _LOADGEN_MODE = mode
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    print(listener.socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _app_conn, [listener])
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        port, n, conc = (int(x) for x in line.split())
        out: dict = {}
        t0 = time.perf_counter()
        if mode == "conn":
            per = n // conc

            async def worker() -> None:
                for _ in range(per):
                    s = await trio.open_tcp_stream("127.0.0.1", port)
                    await s.send_all(REQUEST)
                    got = 0
                    while data := await s.receive_some():
                        got += len(data)
                    assert got == len(RESPONSE), got
                    await s.aclose()

            async with trio.open_nursery() as w:
                for _ in range(conc):
                    w.start_soon(worker)
            out["ops"] = per * conc
        elif mode in ("latency", "rps", "paced"):
            msg = b"x" * 1024
            lat: list[float] = []
            conns = 1 if mode == "latency" else conc
            # latency: `conc - 1` idle connections beside the one measured (streams on the
            # same HBONE connection, as pooled keep-alive connections of a gateway are)
            idle = [await trio.open_tcp_stream("127.0.0.1", port)
                    for _ in range(conc - 1 if mode == "latency" else 0)]

            async def pinger(i: int) -> None:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                # paced: PACED_RATE requests a second in all, the connections 1/rate apart
                slot, every = trio.current_time() + i / PACED_RATE, conns / PACED_RATE
                for _ in range(n // conns):
                    if mode == "paced":
                        await trio.sleep_until(slot)
                        slot += every
                    a = time.perf_counter()
                    await s.send_all(msg)
                    got = 0
                    while got < len(msg):
                        got += len(await s.receive_some())
                    lat.append(time.perf_counter() - a)
                await s.aclose()

            async with trio.open_nursery() as w:
                for i in range(conns):
                    w.start_soon(pinger, i)
            for s in idle:
                await s.aclose()
            n = len(lat)
            lat.sort()
            out["ops"] = n
            out["p50_ms"] = lat[len(lat) // 2] * 1000
            out["p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
        elif mode == "idle":
            socks = []
            for _ in range(n):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(b"hi")
                assert await s.receive_some() == b"hi"
                socks.append(s)
            print("held", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            for s in socks:
                await s.aclose()
            out["ops"] = n
        elif mode == "bulk":
            s = await trio.open_tcp_stream("127.0.0.1", port)
            chunk = b"b" * (1 << 20)
            for _ in range(n):
                await s.send_all(chunk)
            await s.send_eof()
            assert await s.receive_some() == b"done"
            await s.aclose()
            out["ops"] = n
        out["wall"] = time.perf_counter() - t0
        print(repr(out), flush=True)
        nursery.cancel_scope.cancel()


# -- the two proxies (this process) ----------------------------------------------------------


def _labels():
    from nodeproxy.telemetry.metrics import ConnectionLabels

    return ConnectionLabels(reporter="source", source_workload="sleep",
                            destination_workload="echo", connection_security_policy="mutual_tls")


async def _mesh(mode: str, n: int, conc: int, repeat: int) -> list[dict]:
    from nodeproxy.telemetry.accesslog import log_connection
    from nodeproxy.telemetry.metrics import ProxyMetrics
    from tests.unit.test_hbone_connection import make_pki
    from ztunnel.hbone.connection import HboneConnection, LargeReadStream
    from ztunnel.hbone.protocol import connect_headers, new_traceparent
    from ztunnel.hbone.server import serve_hbone_connection
    from ztunnel.relay import Counters, RelayError, relay

    try:
        from ztunnel.sockets import dial
    except ImportError:
        dial = None

    logging.getLogger("nodeproxy.access").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("nodeproxy.access").setLevel(logging.INFO)
    client_ctx, server_ctx = make_pki(Path(tempfile.mkdtemp()))
    metrics_a, metrics_b = ProxyMetrics(), ProxyMetrics()
    labels = _labels()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.l4_micro", "--loadgen", mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    app_port = int(proc.stdout.readline())

    def account(metrics, counters: Counters, started: float, entry: dict) -> None:
        metrics.opened(labels)
        metrics.bytes(labels, received=counters.client_to_server,
                      sent=counters.server_to_client)
        metrics.closed(labels, "-")
        log_connection(**entry, bytes_sent=counters.server_to_client,
                       bytes_recv=counters.client_to_server,
                       duration=round((time.monotonic() - started) * 1000))

    async def inbound(req) -> None:  # node-b
        started = time.monotonic()
        # dialled as ztunnel/inbound.py's _dial_app does (not open_tcp_stream: its
        # happy-eyeballs nursery is task steps the node proxy does not take)
        if dial is not None:
            raw = socket.socket()
            raw.setblocking(False)
            app = await dial(raw, ("127.0.0.1", app_port), 10)
        else:  # a tree from before ztunnel.sockets.dial
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", app_port))
            app = trio.SocketStream(sock)
        stream = await req.accept()
        counters = Counters()
        try:
            await relay(stream, app, counters)
        except RelayError:
            pass
        account(metrics_b, counters, started,
                {"direction": "inbound", "src.addr": "10.0.0.1", "dst.addr": "10.0.0.2:80"})

    hbone_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    hbone_port = hbone_listener.socket.getsockname()[1]
    results = []
    async with trio.open_nursery() as nursery:

        async def serve_hbone() -> None:
            tcp = await hbone_listener.accept()
            tls = trio.SSLStream(LargeReadStream(tcp), server_ctx, server_side=True)
            await tls.do_handshake()
            await serve_hbone_connection(tls, inbound, peer_identity="spiffe://a")

        nursery.start_soon(serve_hbone)
        tcp = await trio.open_tcp_stream("127.0.0.1", hbone_port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        await tls.do_handshake()
        client = HboneConnection(tls, client_side=True, peer_identity="spiffe://b")
        await nursery.start(client.run)

        async def outbound(sock: trio.SocketStream) -> None:  # node-a
            started = time.monotonic()
            src = sock.socket.getpeername()
            headers = connect_headers("10.0.0.2:80", forwarded_for=f"{src[0]}:{src[1]}",
                                      baggage="k8s.namespace.name=default,k8s.pod.name=sleep",
                                      traceparent=new_traceparent())
            upstream = await client.open_stream("10.0.0.2:80", headers)
            counters = Counters()
            try:
                await relay(sock, upstream, counters)
            except RelayError:
                pass
            account(metrics_a, counters, started,
                    {"direction": "outbound", "src.addr": "10.0.0.1", "dst.addr": "10.0.0.2:80"})

        out_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        out_port = out_listener.socket.getsockname()[1]
        try:  # the pod proxy's accept loop (a tree from before it: trio's)
            from ztunnel.sockets import accept_some
        except ImportError:
            nursery.start_soon(trio.serve_listeners, outbound, [out_listener])
        else:
            raw = out_listener.socket._sock  # type: ignore[attr-defined]

            async def accept_loop() -> None:
                def spawn(stream: trio.SocketStream) -> None:
                    nursery.start_soon(outbound, stream)

                while True:
                    await accept_some(raw, spawn)

            nursery.start_soon(accept_loop)
        for _ in range(repeat):
            if mode == "idle":
                tracemalloc.start()
                m0 = tracemalloc.get_traced_memory()[0]
            counter = _StepCounter()
            trio.lowlevel.add_instrument(counter)
            t0 = time.process_time()
            u0 = os.times()
            proc.stdin.write(f"{out_port} {n} {conc}\n")
            proc.stdin.flush()
            if mode == "idle":
                assert await trio.to_thread.run_sync(proc.stdout.readline) == "held\n"
                await trio.sleep(0.2)
                m1 = tracemalloc.get_traced_memory()[0]
                if os.environ.get("L4_MICRO_TOP"):
                    by = os.environ.get("L4_MICRO_TOP_BY", "lineno")
                    for stat in tracemalloc.take_snapshot().statistics(by)[:25]:
                        print(f"{stat.size / n:8.0f} B/conn {stat.count / n:5.1f}/conn "
                              f"{stat.traceback}")
                tracemalloc.stop()
                proc.stdin.write("\n")
                proc.stdin.flush()
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            cpu = time.process_time() - t0
            u1 = os.times()
            trio.lowlevel.remove_instrument(counter)
            res = eval(line)  # noqa: S307 - our own subprocess's repr of a dict
            res["cpu_us_per_op"] = cpu / res["ops"] * 1e6
            res["steps_per_op"] = counter.steps / res["ops"]
            res["sys_share"] = (u1.system - u0.system) / max(cpu, 1e-9)
            if mode == "idle":
                res["bytes_per_conn"] = (m1 - m0) / n
            results.append(res)
            await trio.sleep(0.3)
            if repeat > 1 and mode != "idle":
                break  # the loadgen exits after one run; restart for each repetition
        await client.aclose()
        nursery.cancel_scope.cancel()
    proc.wait(timeout=10)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["conn", "latency", "rps", "paced", "idle", "bulk"])
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("-c", "--concurrency", type=int, default=None,
                    help="connections (conn: 8, rps: 32, latency: 1 + idle ones)")
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the proxies into FILE")
    args = ap.parse_args()
    if os.environ.get("L4_MICRO_CODE"):  # A/B: import ztunnel/nodeproxy from another tree
        sys.path.insert(0, os.environ["L4_MICRO_CODE"])
    if args.loadgen:
        trio.run(_loadgen, args.mode)
        return
    if args.concurrency is None:
        args.concurrency = {"conn": 8, "rps": 32, "paced": 16}.get(args.mode, 1)
    n = args.n or {"conn": 2000, "latency": 3000, "rps": 12800, "paced": 3008, "idle": 95,
                   "bulk": 256}[args.mode]
    all_results = []
    for _ in range(args.repeat):
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        all_results += trio.run(_mesh, args.mode, n, args.concurrency, 1)
        if args.profile:
            prof.disable()
            prof.dump_stats(args.profile)
    import ztunnel

    print("code:", os.path.dirname(os.path.dirname(ztunnel.__file__)))
    for r in all_results:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    cpu = [r["cpu_us_per_op"] for r in all_results]
    steps = statistics.median(r["steps_per_op"] for r in all_results)
    print(f"{args.mode}: CPU µs per op (both proxies): median {statistics.median(cpu):.0f} "
          f"min {min(cpu):.0f} max {max(cpu):.0f}; task steps per op {steps:.1f}; system "
          f"{statistics.median(r['sys_share'] for r in all_results):.0%}")
    if args.mode == "idle":
        print("bytes per idle conn (both proxies, Python heap): "
              f"{statistics.median(r['bytes_per_conn'] for r in all_results):.0f}")


if __name__ == "__main__":
    main()
