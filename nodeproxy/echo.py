"""The echo app: tells a caller what it saw, for tests and the demo.

HTTP/1.1 (h11, keep-alive, chunked bodies) answers with JSON: the pod's name and
namespace, the peer address as seen by the server, method, path, headers and the body's
size. Query parameters: ``status=N`` answers with that status, ``delay=S`` waits first,
``size=N`` pads the reply to about N bytes. A connection whose first bytes are not an HTTP
request line is a plain TCP echo.
"""

from __future__ import annotations

import argparse
import http
import json
import logging
import os
import sys
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
MAX_DELAY = 60.0
MAX_PAD = 64 * 1024 * 1024
IDLE_TIMEOUT = 300.0
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
            b"CONNECT", b"PRI")
_SNIFF = 16


def sniff(first: bytes) -> bool | None:
    """True: HTTP; False: plain bytes; None: cannot tell yet (need more bytes)."""
    for m in _METHODS:
        want = m + b" "
        n = min(len(first), len(want))
        if first[:n] == want[:n]:
            return True if len(first) >= len(want) else None
    return False


def parse_query(target: str) -> dict[str, str]:
    q = parse_qs(urlsplit(target).query, keep_blank_values=True)
    return {k: v[-1] for k, v in q.items()}


def reply_for(
    request: h11.Request,
    body_bytes: int,
    peer: str,
    pod: str,
    namespace: str,
    port: int,
    default_status: int = 200,
) -> tuple[int, float, bytes]:
    """(status, delay, JSON body) for one request: the sans-IO core of the app.

    ``default_status`` is what a pod started with ``--fail-status`` answers to everything
    (a broken replica, for retry and ejection tests).
    """
    target = request.target.decode("latin-1")
    q = parse_query(target)
    status = default_status
    delay = 0.0
    pad = 0
    errors = []
    if "status" in q:
        try:
            status = int(q["status"])
            if not 200 <= status <= 599:
                raise ValueError
        except ValueError:
            errors.append(f"bad status {q['status']!r}")
            status = 400
    if "delay" in q:
        try:
            delay = min(max(float(q["delay"]), 0.0), MAX_DELAY)
        except ValueError:
            errors.append(f"bad delay {q['delay']!r}")
            status = 400
    if "size" in q:
        try:
            pad = min(max(int(q["size"]), 0), MAX_PAD)
        except ValueError:
            errors.append(f"bad size {q['size']!r}")
            status = 400
    headers: dict[str, str] = {}
    for name, value in request.headers:
        k = name.decode("latin-1")
        v = value.decode("latin-1")
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    doc: dict[str, Any] = {
        "pod": pod,
        "namespace": namespace,
        "node": os.environ.get("NODE_NAME", ""),
        "port": port,
        "peer": peer,
        "method": request.method.decode("latin-1"),
        "path": target,
        "headers": headers,
        "body_bytes": body_bytes,
    }
    if errors:
        doc["errors"] = errors
    body = json.dumps(doc).encode()
    if pad > len(body):
        doc["padding"] = "x" * (pad - len(body) - 15)
        body = json.dumps(doc).encode()
    return status, delay, body + b"\n"


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class Echo:
    def __init__(self, name: str, namespace: str, fail_status: int | None = None) -> None:
        self.name, self.namespace = name, namespace
        self.default_status = fail_status or 200

    async def handle(self, port: int, stream: trio.SocketStream) -> None:
        try:
            peer_addr = stream.socket.getpeername()
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
            async with stream:
                first = b""
                kind: bool | None = None
                with trio.move_on_after(IDLE_TIMEOUT):
                    while kind is None:
                        chunk = await stream.receive_some(_SNIFF)
                        if not chunk:
                            return
                        first += chunk
                        kind = sniff(first)
                if kind is None:
                    return
                if kind:
                    await self.http(stream, first, peer, port)
                else:
                    await self.raw(stream, first)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("connection ended: %s", e)

    async def raw(self, stream: trio.SocketStream, first: bytes) -> None:
        """Echo bytes; after the caller's half-close, say how many came, then close.

        Writing after the caller's EOF shows a half-closed connection still carries the other
        direction.
        """
        await stream.send_all(first)
        total = len(first)
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                return
            if not data:
                await stream.send_all(f"[eof after {total} bytes]\n".encode())
                return
            total += len(data)
            await stream.send_all(data)

    async def http(self, stream: trio.SocketStream, first: bytes, peer: str, port: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        conn.receive_data(first)
        while True:
            try:
                request, body_bytes = await self._read_request(conn, stream)
            except h11.RemoteProtocolError as e:
                log.info("bad request from %s: %s", peer, e)
                await self._send_error(conn, stream, e.error_status_hint, str(e))
                return
            if request is None:
                return
            status, delay, body = reply_for(request, body_bytes, peer, self.name,
                                            self.namespace, port, self.default_status)
            if delay:
                await trio.sleep(delay)
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            if request.method == b"HEAD":
                body = b""
            response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
            await self._send(conn, stream, response)
            if body:
                await self._send(conn, stream, h11.Data(data=body))
            await self._send(conn, stream, h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request | None, int]:
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT) as scope:
                    data = await stream.receive_some(65536)
                if scope.cancelled_caught:
                    return None, 0
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, 0

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, event: Any) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def _send_error(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, msg: str
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": msg}).encode() + b"\n"
        try:
            await self._send(conn, stream, h11.Response(status_code=status, headers=[
                ("content-type", "application/json"), ("content-length", str(len(body))),
                ("connection", "close")]))
            await self._send(conn, stream, h11.Data(data=body))
            await self._send(conn, stream, h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass


async def serve(ports: list[int], name: str, namespace: str, host: str = "",
                task_status: Any = trio.TASK_STATUS_IGNORED,
                fail_status: int | None = None) -> None:
    """Listen on every port; ``task_status.started`` gets the bound ports (0 picks one)."""
    app = Echo(name, namespace, fail_status)
    bound = []
    async with trio.open_nursery() as nursery:
        for port in ports:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
            port = listeners[0].socket.getsockname()[1]
            bound.append(port)
            nursery.start_soon(
                partial(trio.serve_listeners, partial(app.handle, port), listeners)
            )
            log.info("echo %s/%s listening on port %d", namespace, name, port)
        task_status.started(bound)


def start_grpc(port: int, name: str) -> Any:
    """A gRPC echo (grpcio's own threads, beside the trio app): /nodeproxy.Echo/Say answers
    ``echo:<request>`` with trailer ``x-served-by: <name>``. Needs grpcio, a test extra
    (the lab tests show gRPC through the gateway with it); the mesh itself never does."""
    from concurrent import futures

    try:
        import grpc  # only when asked for: the mesh itself never needs it
    except ImportError:
        raise SystemExit("echo --grpc-port needs grpcio: pip install grpcio") from None

    def say(request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-served-by", name),))
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        "nodeproxy.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    log.info("gRPC echo %s listening on port %d", name, port)
    return server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="nodeproxy echo", description="HTTP/TCP echo app")
    p.add_argument("--port", type=int, action="append",
                   help="port to listen on (repeat for several; default 8080)")
    p.add_argument("--name", help="name to report (default: $POD_NAME or the host name)")
    p.add_argument("--host", default="", help="address to bind (default: all)")
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="also serve gRPC (unary /nodeproxy.Echo/Say, raw bytes) on this port")
    p.add_argument("--fail-status", type=int, metavar="CODE",
                   help="answer every HTTP request with this status (a broken replica)")
    args = p.parse_args(argv)
    if args.fail_status is not None and not 200 <= args.fail_status <= 599:
        p.error("--fail-status must be an HTTP status (200-599)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    name = args.name or os.environ.get("POD_NAME") or os.uname().nodename
    namespace = os.environ.get("POD_NAMESPACE", "")
    grpc_server = start_grpc(args.grpc_port, name) if args.grpc_port else None
    try:
        trio.run(
            partial(serve, fail_status=args.fail_status),
            args.port or [8080], name, namespace, args.host,
        )
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"echo: {e}", file=sys.stderr)
        return 1
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
