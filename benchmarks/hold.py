"""Open N keep-alive HTTP connections, use each once, and hold them idle until stdin closes.

Run inside a client pod (standalone: no project imports). Every connection carries one full
request/response first, so each is known to be tunneled end to end before it is counted.
Prints `ready N` when all are open, or `error …` and exits 1.
"""

from __future__ import annotations

import resource
import socket
import sys

BATCH = 100


def _read_response(sock: socket.socket) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer {head[:40]!r}")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the response body")
        body += chunk


def main(argv: list[str]) -> int:
    host, port, count, path = argv[0], int(argv[1]), int(argv[2]), argv[3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            batch = []
            for _ in range(min(BATCH, count - len(held))):
                s = socket.create_connection((host, port), timeout=30)
                batch.append(s)
                held.append(s)
            for s in batch:
                s.sendall(request)
            for s in batch:
                _read_response(s)
    except (OSError, ValueError) as e:
        print(f"error after {len(held)} connections: {e}", flush=True)
        return 1
    print(f"ready {len(held)}", flush=True)
    sys.stdin.read()  # hold until the harness closes our stdin
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
