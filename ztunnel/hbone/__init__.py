"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS (Istio ambient's wire format)."""

from .connection import HboneConnectError, HboneConnection, HboneStatusError, HboneStream
from .pool import HbonePool, PoolKey
from .protocol import (
    HBONE_PORT,
    ConnectRequest,
    HboneError,
    HboneRequestError,
    baggage_value,
    connect_headers,
    format_authority,
    new_traceparent,
    parse_authority,
    parse_connect,
)
from .server import HboneRequest, serve_hbone_connection

__all__ = [
    "HBONE_PORT",
    "ConnectRequest",
    "HboneConnectError",
    "HboneConnection",
    "HboneError",
    "HbonePool",
    "HboneRequest",
    "HboneRequestError",
    "HboneStatusError",
    "HboneStream",
    "PoolKey",
    "baggage_value",
    "connect_headers",
    "format_authority",
    "new_traceparent",
    "parse_authority",
    "parse_connect",
    "serve_hbone_connection",
]
