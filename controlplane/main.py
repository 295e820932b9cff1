"""``nodeproxy controlplane``: parse the command line and run :func:`controlplane.server.serve`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import trio

from controlplane.ca import CAError
from controlplane.kube.client import SA_DIR, KubeConfig, KubeError
from controlplane.kube.publish import TemplateError
from controlplane.server import ServerConfig, serve
from nodeproxy.certs import CertError
from nodeproxy.telemetry.server import parse_address

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodeproxy controlplane",
        description="The mesh control plane: resources → mesh state, discovery and CA.",
    )
    p.add_argument("--source", choices=("dir", "kube"), default="dir",
                   help="where resources come from: a YAML directory or the Kubernetes API")
    p.add_argument("--kubernetes", dest="source", action="store_const", const="kube",
                   help="same as --source kube")
    p.add_argument("--resources", type=Path, help="directory of YAML resources (--source dir)")
    p.add_argument("--state-dir", required=True, type=Path, help="holds the CA (state-dir/ca)")
    p.add_argument("--tokens", type=Path,
                   help="YAML mapping token → node name (required with --source dir)")
    p.add_argument("--kube-api", metavar="HOST:PORT",
                   help="the API server (default: in-cluster, KUBERNETES_SERVICE_HOST/PORT)")
    p.add_argument("--kube-sa-dir", type=Path, default=SA_DIR,
                   help="the ServiceAccount token and ca.crt (default: %(default)s)")
    p.add_argument("--kube-node-service-account", action="append", metavar="NS/NAME",
                   help="node proxies' ServiceAccount for TokenReview "
                        "(repeatable; default nodeproxy-system/nodeproxy-node)")
    p.add_argument("--gateway-template", type=Path,
                   help="gateway template: file or mounted ConfigMap directory")
    p.add_argument("--gateway-image", help="image of gateway Deployments")
    p.add_argument("--gateway-controlplane", metavar="HOST:PORT",
                   help="the control plane address gateways are given")
    p.add_argument("--listen", default="0.0.0.0:15012", help="discovery and CA (TLS)")
    p.add_argument("--admin", default="0.0.0.0:15014", help="metrics and /debug (plain HTTP)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--cert-ttl", default=86400, type=int, metavar="SECONDS",
                   help="lifetime of the certificates signed (default 86400)")
    p.add_argument("--ping-interval", default=15.0, type=float, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Validate arguments into a ServerConfig; ValueError with a clear message otherwise."""
    for address in (args.listen, args.admin):
        parse_address(address)
    if args.cert_ttl <= 0:
        raise ValueError("--cert-ttl must be a positive number of seconds")
    if args.tokens is not None and not args.tokens.is_file():
        raise ValueError(f"--tokens {args.tokens}: no such file")
    kube = None
    accounts = []
    if args.source == "dir":
        if args.resources is None or args.tokens is None:
            raise ValueError("--source dir needs --resources and --tokens")
        if not args.resources.is_dir():
            raise ValueError(f"--resources {args.resources}: no such directory")
    else:
        try:
            kube = KubeConfig.in_cluster(sa_dir=args.kube_sa_dir, environ=(
                {"KUBERNETES_SERVICE_HOST": parse_address(args.kube_api)[0],
                 "KUBERNETES_SERVICE_PORT": str(parse_address(args.kube_api)[1])}
                if args.kube_api else None))
        except KubeError as e:
            raise ValueError(str(e)) from None
        for entry in args.kube_node_service_account or ["nodeproxy-system/nodeproxy-node"]:
            ns, _, name = entry.partition("/")
            if not ns or not name:
                raise ValueError(f"--kube-node-service-account {entry!r}: use NAMESPACE/NAME")
            accounts.append((ns, name))
    return ServerConfig(
        resources=args.resources,
        state_dir=args.state_dir,
        tokens=args.tokens,
        listen=args.listen,
        admin=args.admin,
        trust_domain=args.trust_domain,
        cert_ttl=timedelta(seconds=args.cert_ttl),
        ping_interval=args.ping_interval,
        source=args.source,
        kube=kube,
        kube_node_service_accounts=tuple(accounts),
        gateway_template=args.gateway_template,
        gateway_image=args.gateway_image,
        gateway_controlplane=args.gateway_controlplane,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"nodeproxy controlplane: {e}", file=sys.stderr)
        return 2
    try:
        trio.run(_run, config)
    except KeyboardInterrupt:
        return 0
    except (CAError, CertError, OSError, TemplateError) as e:
        log.error("control plane cannot start: %s", e)
        return 1
    return 0


async def _run(config: ServerConfig) -> None:
    await serve(config)


if __name__ == "__main__":
    sys.exit(main())
