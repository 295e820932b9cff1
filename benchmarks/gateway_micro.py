"""In-process CPU cost of the L7 gateway per request (a micro-benchmark, not part of `make bench`).

The gateway runs in this process, as ``tests/unit/test_gateway_support.py`` starts it (a
``StaticState``, real TLS, HBONE in); its endpoint is an nginx serving 1 KiB (``/1k``) on
loopback, dialled as plain TCP (the production upstream would be HBONE through the pool: that
part is ztunnel's and is not measured here). The load comes from a separate process (so its
CPU is not counted): one HBONE connection to the gateway carrying ``--conns`` tunnels, each
running keep-alive HTTP/1.1 requests, or an HTTP/2 connection with ``--streams`` concurrent
streams per tunnel. The figure is this process's CPU time (``time.process_time``) between the
end of the warm-up and the last request, divided by the number of requests: on a machine
shared with other work that moves far less than requests per second do.

    .venv/bin/python -m benchmarks.gateway_micro --proto h1 --conns 32 --requests 5000
    .venv/bin/python -m benchmarks.gateway_micro --proto h2 --conns 4 --streams 8
    .venv/bin/python -m benchmarks.gateway_micro --proto h1 --profile /tmp/gw.prof
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio

AUTHORITY = "10.96.0.10:80"
NS = "shop"
CLIENT_ID = "spiffe://cluster.local/ns/front/sa/client"
BODY = 1024
NGINX = "/usr/sbin/nginx"


# -- backend ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    (workdir / "www").mkdir()
    (workdir / "www" / "1k").write_bytes(b"x" * BODY)
    (workdir / "tmp").mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ root {workdir}/www; }}
    }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")


# -- the gateway side (this process) -----------------------------------------------------


def _mesh(backend_port: int):  # type: ignore[no-untyped-def]
    from nodeproxy.model import HBONE, MeshState, Namespace, Service, ServicePort, Workload

    wl = Workload(uid="uid-web", name="web", namespace=NS, node="n1", service_account="web",
                  addresses=("127.0.0.1",), labels={"app": "web"}, protocol=HBONE,
                  named_ports={"http": backend_port})
    svc = Service(name="web", namespace=NS, addresses=("10.96.0.10",),
                  ports=(ServicePort(80, "http", name="http"),), endpoints=(wl.uid,))
    return MeshState(namespaces={NS: Namespace(NS), "front": Namespace("front")},
                     workloads={wl.uid: wl}, services={svc.key: svc}, version=1)


async def gateway_side(args: argparse.Namespace, workdir: Path, backend_port: int) -> dict:
    from controlplane.ca import CertificateAuthority
    from l7gateway.gateway import Gateway, StaticState
    from nodeproxy.certmanager import CertificateManager

    ca = CertificateAuthority.create("cluster.local")
    chain, key = ca.issue(CLIENT_ID, timedelta(hours=1))
    (workdir / "client.json").write_text(json.dumps({
        "chain": [c.decode() for c in chain], "key": key.decode(),
        "root": ca.root_pem.decode()}))

    async def sign(csr: bytes) -> list[bytes]:
        return ca.sign_csr(csr, timedelta(hours=1))

    certs = CertificateManager(sign, ca.root_pem)

    async def dial(ep: Any) -> trio.abc.Stream:
        return await trio.open_tcp_stream(ep.address, ep.port)

    gw = Gateway(NS, StaticState(_mesh(backend_port)), certs, dial=dial,
                 rng=random.Random(7))
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(partial(
            gw.run, listen="127.0.0.1:0", metrics="127.0.0.1:0", ready="127.0.0.1:0"))
        await certs.get(gw.identity)
        cmd = [sys.executable, "-m", "benchmarks.gateway_micro", "--client",
               str(workdir / "client.json"), "--port", str(ports.hbone), "--proto", args.proto,
               "--conns", str(args.conns), "--streams", str(args.streams),
               "--requests", str(args.requests), "--warmup", str(args.warmup)]
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        buf = b""
        prof = cProfile.Profile() if args.profile else None
        cpu0 = wall0 = 0.0
        try:
            while True:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("client exited early")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line == b"W":
                        cpu0, wall0 = time.process_time(), time.perf_counter()
                        if prof:
                            prof.enable()
                    elif line.startswith(b"D "):
                        cpu1, wall1 = time.process_time(), time.perf_counter()
                        if prof:
                            prof.disable()
                            prof.dump_stats(args.profile)
                        done = json.loads(line[2:])
                        n = done["requests"]
                        result = {
                            "proto": args.proto, "conns": args.conns,
                            "streams": args.streams if args.proto == "h2" else None,
                            "requests": n, "errors": done["errors"],
                            "gateway_cpu_us_per_request": round((cpu1 - cpu0) / n * 1e6, 1),
                            "requests_per_s": round(n / (wall1 - wall0)),
                            "gateway_cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 2),
                            "client_p50_ms": done["p50_ms"],
                        }
                        break
                if result:
                    break
        finally:
            await proc.wait()
            nursery.cancel_scope.cancel()
    return result


# -- the load (a separate process) --------------------------------------------------------


class _Load:
    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup
        self.started = 0
        self.done = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.measuring = trio.Event()
        self.finished = trio.Event()

    def take(self) -> bool:
        if self.started >= self.warmup + self.total:
            return False
        self.started += 1
        return True

    def complete(self, seconds: float, ok: bool) -> None:
        self.done += 1
        if not ok:
            self.errors += 1
        if self.done == self.warmup:
            print("W", flush=True)
            self.measuring.set()
        elif self.done > self.warmup:
            self.latencies.append(seconds)
        if self.done == self.warmup + self.total:
            self.finished.set()


REQUEST = (b"GET /1k HTTP/1.1\r\nhost: web.shop\r\nuser-agent: micro\r\n"
           b"accept: */*\r\n\r\n")


async def _h1_worker(stream: Any, load: _Load) -> None:
    buf = b""
    while load.take():
        t0 = time.perf_counter()
        await stream.send_all(REQUEST)
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buf) >= end + 4 + length:
                    ok = head.startswith(b"http/1.1 200")
                    buf = buf[end + 4 + length:]
                    break
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise RuntimeError("gateway closed the connection")
            buf += chunk
        load.complete(time.perf_counter() - t0, ok)


async def _h2_worker(stream: Any, load: _Load, streams: int) -> None:
    import h2.config
    import h2.connection
    import h2.events

    import tests.h2peer  # noqa: F401 - h2's DATA repr made cheap, as in the tests

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    started: dict[int, float] = {}
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "web.shop"),
               (":path", "/1k"), ("user-agent", "micro"), ("accept", "*/*")]
    status: dict[int, bool] = {}

    def fill() -> None:
        while len(started) < streams and load.take():
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=True)
            started[sid] = time.perf_counter()

    fill()
    while started:
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError("gateway closed the connection")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = dict(ev.headers).get(b":status") == b"200"
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                t0 = started.pop(ev.stream_id)
                load.complete(time.perf_counter() - t0, status.pop(ev.stream_id, False))
        fill()
    out = conn.data_to_send()
    if out:
        await stream.send_all(out)


async def client_side(args: argparse.Namespace) -> None:
    from nodeproxy import tlsconfig
    from ztunnel.hbone.connection import HboneConnection

    material = json.loads(Path(args.client).read_text())
    ctx = tlsconfig.client_context([c.encode() for c in material["chain"]],
                                   material["key"].encode(), material["root"].encode())
    load = _Load(args.requests, args.warmup)
    async with trio.open_nursery() as nursery:
        tcp = await trio.open_tcp_stream("127.0.0.1", args.port)
        tls = trio.SSLStream(tcp, ctx, server_side=False)
        await tls.do_handshake()
        hbone = HboneConnection(tls, client_side=True)
        await nursery.start(hbone.run)
        tunnels = [await hbone.open_stream(AUTHORITY, [("forwarded", 'for="127.0.0.1:40000"')])
                   for _ in range(args.conns)]
        async with trio.open_nursery() as workers:
            for t in tunnels:
                if args.proto == "h1":
                    workers.start_soon(_h1_worker, t, load)
                else:
                    workers.start_soon(_h2_worker, t, load, args.streams)
        lat = sorted(load.latencies)
        print("D " + json.dumps({
            "requests": len(lat), "errors": load.errors,
            "p50_ms": round(statistics.median(lat) * 1000, 3) if lat else None}), flush=True)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway_micro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--proto", choices=("h1", "h2"), default="h1")
    p.add_argument("--conns", type=int, default=32, help="tunnels (HTTP connections)")
    p.add_argument("--streams", type=int, default=8, help="HTTP/2 streams per connection")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--profile", help="write a cProfile of the measured part here")
    p.add_argument("--no-access-log", action="store_true",
                   help="log WARNING and up only (by default INFO, as the gateway process does, "
                        "to /dev/null)")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        trio.run(client_side, args)
        return 0
    if shutil.which(NGINX) is None and not os.path.exists(NGINX):
        print("needs nginx", file=sys.stderr)
        return 1
    # the gateway logs INFO (one access-log line per request) as `nodeproxy gateway` does
    try:  # as the gateway process sets it up (older trees: the same format, by hand)
        from l7gateway.gateway import configure_logging
    except ImportError:
        def configure_logging(level: int, handler: logging.Handler) -> None:  # type: ignore
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.basicConfig(level=level, handlers=[handler])
    level = logging.WARNING if args.no_access_log else logging.INFO
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the process's log stream, to its end
    try:  # the process's own handler (buffered), on /dev/null instead of stderr
        configure_logging(level, stream=devnull)
    except TypeError:  # older trees: a handler per line
        configure_logging(level, logging.FileHandler(os.devnull))
    workdir = Path(tempfile.mkdtemp(prefix="gwmicro-"))
    workdir.chmod(0o755)  # nginx's worker runs as nobody
    nginx, port = start_nginx(workdir)
    try:
        for _ in range(args.repeat):
            print(json.dumps(trio.run(gateway_side, args, workdir, port)), flush=True)
    finally:
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
