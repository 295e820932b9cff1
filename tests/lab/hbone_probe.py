"""A hand-made HBONE client for the lab tests' bad-input cases.

Run inside a node's netns (`nodeproxy lab exec node/NODE -- python -m tests.lab.hbone_probe
…`). It signs itself a certificate with the lab's CA (or with a foreign CA) and talks to a
pod's port 15008 directly, printing one JSON line with what happened.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import trio

from controlplane.ca import CertificateAuthority
from nodeproxy.tlsconfig import client_context
from ztunnel.hbone.connection import HboneConnection, HboneError, HboneStatusError


async def tls_to(target: str, ca: CertificateAuthority, identity: str, roots: bytes):
    chain, key = ca.issue(identity, timedelta(minutes=10))
    ctx = client_context(chain, key, roots)
    tcp = await trio.open_tcp_stream(target, 15008)
    tls = trio.SSLStream(tcp, ctx, server_hostname=None)
    await tls.do_handshake()
    return tls


async def connect_case(tls, authority: str, headers=()) -> dict:
    conn = HboneConnection(tls, client_side=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            stream = await conn.open_stream(authority, list(headers))
        except HboneStatusError as exc:
            result = {"status": exc.status}
        except HboneError as exc:
            result = {"error": str(exc) or type(exc).__name__}
        else:
            await stream.send_all(b"ping from probe\n")
            data = await stream.receive_some(1024)
            result = {"status": 200, "echo": data.decode(errors="replace")}
            await stream.aclose()
        nursery.cancel_scope.cancel()
    return result


async def not_connect_case(tls, authority: str) -> dict:
    """A plain GET on the HBONE port: must be answered 400."""
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", authority)],
        end_stream=True,
    )
    await tls.send_all(h2c.data_to_send())
    with trio.fail_after(10):
        while True:
            data = await tls.receive_some(65536)
            if not data:
                return {"error": "connection closed"}
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return {"status": int(dict(event.headers)[b":status"])}
                if isinstance(event, h2.events.StreamReset):
                    return {"error": f"reset {event.error_code}"}
            out = h2c.data_to_send()
            if out:
                await tls.send_all(out)


async def main_async(args) -> dict:
    ca_dir = Path(args.ca_dir)
    ca = CertificateAuthority.load_or_create(ca_dir)
    roots = ca.root_pem
    if args.case == "foreign-ca":
        foreign = CertificateAuthority.create("cluster.local")
        try:
            chain, key = foreign.issue(args.identity, timedelta(minutes=10))
            ctx = client_context(chain, key, roots)
            tcp = await trio.open_tcp_stream(args.target, 15008)
            tls = trio.SSLStream(tcp, ctx, server_hostname=None)
            await tls.do_handshake()
            # TLS 1.3: the server checks our certificate after our side finished; a refusal
            # shows when we try to use the connection
            return await connect_case(tls, f"{args.target}:{args.port}")
        except (trio.BrokenResourceError, OSError) as exc:
            return {"refused": True, "error": str(exc) or type(exc).__name__}
    tls = await tls_to(args.target, ca, args.identity, roots)
    authority = args.authority or f"{args.target}:{args.port}"
    if args.case == "ok":
        return await connect_case(tls, authority)
    if args.case == "wrong-address":
        return await connect_case(tls, authority)
    if args.case == "not-connect":
        return await not_connect_case(tls, authority)
    if args.case == "big-headers":
        big = [("x-big", "a" * 200_000)]
        first = await connect_case(tls, authority, big)
        tls2 = await tls_to(args.target, ca, args.identity, roots)
        after = await connect_case(tls2, authority)
        return {"big": first, "after": after}
    raise SystemExit(f"unknown case {args.case}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca-dir", required=True)
    parser.add_argument("--identity", default="spiffe://cluster.local/ns/shop/sa/client")
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--authority")
    parser.add_argument(
        "--case",
        required=True,
        choices=["ok", "wrong-address", "not-connect", "big-headers", "foreign-ca"],
    )
    args = parser.parse_args()
    try:
        result = trio.run(main_async, args)
    except Exception as exc:  # report, the test decides
        result = {"exception": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
