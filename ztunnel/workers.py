"""Worker processes sharing the pod listeners: ``nodeproxy ztunnel --workers N``.

One trio process cannot make thousands of tunnelled connections a second, so the node proxy can
run N worker processes, each a full :class:`~ztunnel.proxy.NodeProxy` (its own discovery
connection, certificates, HBONE pool and pod listeners). The pod listeners carry SO_REUSEPORT,
so every worker binds 15001/15006/15008 in every pod netns and the kernel spreads new
connections over them.

The parent process (the supervisor here) does no proxying. It:

- keeps the one connection to the CNI node agent and re-serves it to the workers: every Add /
  Keep / Del / SnapshotSent goes to every worker (the netns fd dup'ed per worker), and the agent
  gets its ack once every live worker acked; an error from any worker is the nack (a failed Add
  is rolled back with a Del on all workers, as a single proxy would not have the pod);
- replays its current pod set (+ SnapshotSent once the agent sent one) to a worker that
  (re)starts, as the agent does for a reconnecting proxy;
- restarts a worker that dies (with back-off), and on SIGTERM stops them all (each drains);
- serves the node's telemetry addresses: /metrics is the sum of the workers' samples, readiness
  is "every worker ready", admin pages are merged (lists concatenated with a ``worker`` field;
  mesh-state pages from one worker; ``/workers`` lists the workers and their private ports).

Parent and worker talk over a SOCK_SEQPACKET socketpair handed to the worker at exec (fd
``--worker-fd``): private to the two processes, no path to protect, and its end-of-file tells
each side the other is gone. The worker first sends one JSON packet with its private telemetry
ports (127.0.0.1, ephemeral), then speaks the node agent protocol (Hello, acks) on it.

:class:`FanOut` (the parent's pod set and what each agent message means for the workers),
:func:`aggregate` and :func:`merge_metrics` are sans-IO; the rest is the trio driver.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeproxy import httpio
from nodeproxy import inpod_protocol as protocol
from nodeproxy.inpod_protocol import Add, Del, Keep, Message, ProtocolError, SnapshotSent
from nodeproxy.telemetry.server import (
    Readiness,
    Request,
    Response,
    json_response,
    serve_http,
)
from ztunnel.inpod.channel import PodInfo, run_channel

log = logging.getLogger(__name__)

MAX_WORKERS = 64
# the agent waits 5 s for an ack (protocol.ACK_TIMEOUT): answer it before that
WORKER_ACK_TIMEOUT = 4.0
# a worker reports once it has the mesh state (it must not take connections before): no
# deadline for that (the control plane may be away), a warning after this long
WORKER_SLOW_START = 30.0
HELLO_TIMEOUT = 10.0  # from its report to its Hello
FIRST_JOIN_WAIT = 30.0  # how long the agent channel waits for every worker at start-up
MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long restarts without back-off
HTTP_TIMEOUT = 2.0
REPORT_TYPE = "worker"
# gauges every worker reports alike (build info): the merge keeps one value, not the sum
SAME_IN_EVERY_WORKER = frozenset({"istio_build"})
# admin pages built from the mesh state, alike in every worker: answered by one worker
STATE_PAGES = ("/workloads", "/services", "/policies")
LIST_PAGES = ("/pods", "/connections", "/certificates")


# -- sans-IO: the fan-out -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One message for a worker; ``fd`` is the parent's netns fd (an Add's), never closed by
    whoever sends it (the sender dups it per worker)."""

    msg: Message
    fd: int | None = None


@dataclass
class Settled:
    """What an agent exchange leaves to do once the workers answered."""

    rollback: list[Outgoing] = field(default_factory=list)  # for every worker
    close_fds: list[int] = field(default_factory=list)  # parent fds no longer needed


class FanOut:
    """The parent's pod set, as the agent told it, and the worker messages each agent message
    becomes.

    For one agent message: :meth:`forward` gives what every worker gets, then, with the
    aggregated answer, :meth:`settle` updates the pod set. :meth:`replay` is what a worker that
    (re)joins gets. The parent keeps one netns fd per pod to replay with.
    """

    def __init__(self) -> None:
        self.pods: dict[str, tuple[Add, int]] = {}
        # pods the agent named since its last SnapshotSent (as NodeProxy counts them)
        self.seen: set[str] = set()
        self.synced = False  # the agent sent at least one SnapshotSent

    def forward(self, msg: Message, fd: int | None = None) -> list[Outgoing]:
        if isinstance(msg, Add):
            if fd is None:
                raise ProtocolError("add without a netns fd")
            return [Outgoing(msg, fd)]
        if isinstance(msg, (Keep, Del)):
            return [Outgoing(msg)]
        if isinstance(msg, SnapshotSent):
            # a worker counts what *it* saw since its last snapshot; pods the parent drops now
            # get an explicit Del so that no worker keeps one the agent no longer has
            return [Outgoing(Del(uid)) for uid in self._unseen()] + [Outgoing(msg)]
        raise ProtocolError(f"unexpected message from the agent: {type(msg).__name__}")

    def settle(self, msg: Message, fd: int | None, error: str | None) -> Settled:
        out = Settled()
        if isinstance(msg, Add):
            assert fd is not None
            old = self.pods.pop(msg.uid, None)
            if old is not None and old[1] != fd:
                out.close_fds.append(old[1])
            if error is None:
                self.pods[msg.uid] = (msg, fd)
                self.seen.add(msg.uid)
            else:
                # as a single proxy that failed to start it: the pod is not served anywhere
                out.close_fds.append(fd)
                out.rollback.append(Outgoing(Del(msg.uid)))
        elif isinstance(msg, Keep):
            if msg.uid in self.pods:
                self.seen.add(msg.uid)
        elif isinstance(msg, Del):
            old = self.pods.pop(msg.uid, None)
            if old is not None:
                out.close_fds.append(old[1])
        elif isinstance(msg, SnapshotSent):
            for uid in self._unseen():
                out.close_fds.append(self.pods.pop(uid)[1])
            self.seen = set()
            self.synced = True
        return out

    def replay(self) -> list[Outgoing]:
        """What a (re)joining worker gets: every pod, then SnapshotSent once the agent sent one
        (before that, the agent's own SnapshotSent will reach it)."""
        out = [Outgoing(add, fd) for add, fd in self.pods.values()]
        if self.synced:
            out.append(Outgoing(SnapshotSent()))
        return out

    def close(self) -> list[int]:
        fds = [fd for _, fd in self.pods.values()]
        self.pods.clear()
        return fds

    def _unseen(self) -> list[str]:
        return [uid for uid in self.pods if uid not in self.seen]


GONE = object()  # a worker that died or was dropped before it answered


def aggregate(results: Mapping[int, str | None | object], *, need_one: bool) -> str | None:
    """The agent's ack for the workers' answers (worker index → error text, None for an ack,
    :data:`GONE`): the first error is the nack; workers that went away do not count (they get
    the replay when they come back), but with ``need_one`` (an Add) at least one worker must
    have taken it."""
    errors = [
        f"worker {i}: {r}" for i, r in sorted(results.items()) if r is not GONE and r is not None
    ]
    if errors:
        return "; ".join(errors)
    if need_one and not any(r is None for r in results.values()):
        return "no node proxy worker is running"
    return None


# -- sans-IO: metrics -------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}.0"
    return repr(value)


def merge_metrics(texts: Iterable[str]) -> str:
    """Sum the workers' Prometheus text expositions into one.

    Counters, histograms (buckets, sums, counts) and gauges with the same name and labels are
    added; :data:`SAME_IN_EVERY_WORKER` gauges keep the largest value. Families and samples keep
    the order in which they first appear. A worker's text that does not parse is skipped
    (logged): the others are still reported.
    """
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(text))
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("a worker's metrics do not parse (%s): left out", exc)
            continue
        for fam in parsed:
            entry = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            samples = entry[2]
            keep_max = fam.name in SAME_IN_EVERY_WORKER
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in samples:
                    samples[key] = (
                        max(samples[key], s.value) if keep_max else samples[key] + s.value
                    )
                else:
                    samples[key] = s.value
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        doc_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {name} {doc_text}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples.items():
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{sample_name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def merge_admin(path: str, answers: Sequence[tuple[int, Any]]) -> Any:
    """One admin page from the workers' answers (worker index, parsed JSON).

    Lists are concatenated, each dict row tagged with its ``worker``; mesh-state pages
    (:data:`STATE_PAGES`) are the same in every worker and come from the first; anything else
    (``/config_dump``) is a list of per-worker objects tagged with ``worker``.
    """
    if not answers:
        return []
    if path in STATE_PAGES:
        return answers[0][1]
    if all(isinstance(body, list) for _, body in answers):
        out: list[Any] = []
        for i, body in answers:
            out += [{**row, "worker": i} if isinstance(row, dict) else row for row in body]
        return out
    return [
        {**body, "worker": i} if isinstance(body, dict) else {"worker": i, "body": body}
        for i, body in answers
    ]


# -- worker command line ----------------------------------------------------------------------


def worker_argv(args: argparse.Namespace, index: int, fd: int) -> list[str]:
    """The command line of worker ``index``: the parent's options, private telemetry."""
    return [
        sys.executable, "-m", "nodeproxy.cli", "ztunnel",
        "--node", args.node,
        "--controlplane", args.controlplane,
        "--ca-root", str(args.ca_root),
        "--token-file", str(args.token_file),
        "--admin", "127.0.0.1:0",
        "--metrics", "127.0.0.1:0",
        "--ready", "127.0.0.1:0",
        "--drain-seconds", str(args.drain_seconds),
        "--agent-socket", args.agent_socket,  # not used by a worker; the option is required
        "--worker-fd", str(fd),
        "--worker-index", str(index),
    ]  # fmt: skip


def encode_report(index: int, ports: Mapping[str, int]) -> bytes:
    """The worker's first packet to the parent: who it is and where its telemetry listens."""
    return json.dumps({"type": REPORT_TYPE, "index": index, "pid": os.getpid(), **ports}).encode()


def decode_report(raw: bytes) -> dict[str, int]:
    """Parse the worker's first packet; ProtocolError when it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"worker report is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("type") != REPORT_TYPE:
        raise ProtocolError(f"expected a worker report, got {raw[:100]!r}")
    out: dict[str, int] = {}
    for key in ("pid", "admin", "metrics", "ready"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**22:
            raise ProtocolError(f"worker report: bad {key} {value!r}")
        out[key] = value
    return out


# -- the driver: one worker ---------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    """One message queued for one worker, and its answer."""

    msg: Message
    fd: int | None  # this worker's own dup; the sender closes it
    done: trio.Event = field(default_factory=trio.Event)
    result: str | None | object = GONE

    def finish(self, result: str | None | object) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if not self.done.is_set():
            self.result = result
            self.done.set()


class Worker:
    """One worker process and its channel; restarted by :meth:`run` whenever it dies."""

    def __init__(self, index: int, argv_for: Any) -> None:
        self.index = index
        self._argv_for = argv_for
        self.process: trio.Process | None = None
        self.state = "stopped"  # starting | replaying | live | stopped
        self.ports: dict[str, int] = {}
        self.starts = 0
        self.last_error = ""
        self.queue: list[Item] = []
        self._wake = trio.Event()
        self.stopping = False

    def describe(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": self.process.pid if self.process and self.process.returncode is None else None,
            "state": self.state,
            "starts": self.starts,
            "ports": dict(self.ports),
            "last_error": self.last_error or None,
        }

    @property
    def live(self) -> bool:
        return self.state == "live"

    @property
    def joined(self) -> bool:
        return self.state in ("replaying", "live")

    def enqueue(self, out: Outgoing) -> Item:
        fd = os.dup(out.fd) if out.fd is not None else None
        item = Item(out.msg, fd)
        self.queue.append(item)
        self._wake.set()
        return item

    def _fail_queue(self) -> None:
        items, self.queue = self.queue, []
        for item in items:
            item.finish(GONE)

    async def run(self, sup: Supervisor) -> None:
        """Start, serve and restart the worker until the supervisor stops."""
        backoff = MIN_BACKOFF
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._run_once(sup)
            except (OSError, ProtocolError, trio.TooSlowError) as e:
                self.last_error = str(e) or type(e).__name__
                log.warning("worker %d failed: %s", self.index, self.last_error)
            except Exception as e:  # a bug here must not take the node's other workers down
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("worker %d: supervisor error", self.index)
            finally:
                self.state = "stopped"
                self._fail_queue()
            if self.stopping:
                return
            if time.monotonic() - started > STABLE_AFTER:
                backoff = MIN_BACKOFF
            sup.restarts += 1
            log.warning("worker %d: restarting in %.1f s", self.index, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _run_once(self, sup: Supervisor) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.state = "starting"
            self.starts += 1
            child_fd = child_sock.fileno()
            self.process = await trio.lowlevel.open_process(
                self._argv_for(self.index, child_fd),
                stdin=subprocess.DEVNULL,
                pass_fds=(child_fd,),
            )
            child_sock.close()
            log.info("worker %d started (pid %d)", self.index, self.process.pid)
            sock = trio.socket.from_stdlib_socket(parent_sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit, nursery.cancel_scope)
                await self._serve(sup, sock)
                nursery.cancel_scope.cancel()
        finally:
            child_sock.close()
            parent_sock.close()
            await self._reap(sup.drain_seconds)

    async def _watch_exit(self, scope: trio.CancelScope) -> None:
        assert self.process is not None
        code = await self.process.wait()
        if not self.stopping:
            self.last_error = f"exited with status {code}"
            log.warning("worker %d (pid %d) exited with status %s",
                        self.index, self.process.pid, code)
        scope.cancel()

    async def _serve(self, sup: Supervisor, sock: trio.socket.SocketType) -> None:
        with trio.move_on_after(WORKER_SLOW_START) as slow:
            raw = await sock.recv(protocol.MAX_MESSAGE)
        if slow.cancelled_caught:
            log.warning("worker %d has not joined after %.0f s (waiting for the mesh state?)",
                        self.index, WORKER_SLOW_START)
            raw = await sock.recv(protocol.MAX_MESSAGE)
        if not raw:
            raise ProtocolError("worker closed its channel before reporting")
        report = decode_report(raw)
        report.pop("pid", None)
        self.ports = report
        with trio.fail_after(HELLO_TIMEOUT):
            hello, fd = await protocol.recv_msg(sock)
        if fd is not None:
            os.close(fd)
        if not isinstance(hello, protocol.Hello) or hello.version != protocol.VERSION:
            raise ProtocolError(f"worker sent {hello!r} instead of hello")
        # join between two agent exchanges, so that the replay and what follows are in order
        async with sup.lock:
            self.state = "replaying"
            replay = [self.enqueue(out) for out in sup.fanout.replay()]
        log.info("worker %d joined: replaying %d messages", self.index, len(replay))
        sup.joined_changed()
        while True:
            if not self.queue:
                if replay is not None:
                    replay = None
                    self.state = "live"
                    log.info("worker %d is live (ports %s)", self.index, self.ports)
                    sup.joined_changed()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            item = self.queue[0]
            try:
                await protocol.exchange(sock, item.msg, item.fd, timeout=WORKER_ACK_TIMEOUT)
                result: str | None = None
            except protocol.Refused as e:
                result = str(e).split(": ", 1)[-1]
            self.queue.pop(0)
            item.finish(result)

    async def _reap(self, drain_seconds: float) -> None:
        """Make sure the process is gone: SIGTERM (it drains), SIGKILL after the drain."""
        p = self.process
        if p is None:
            return
        with trio.CancelScope(shield=True):
            if p.returncode is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with trio.move_on_after(drain_seconds + 5):
                    await p.wait()
                if p.returncode is None:
                    p.kill()
                    await p.wait()

    def signal(self, sig: int) -> None:
        p = self.process
        if p is not None and p.returncode is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


# -- the driver: the supervisor -------------------------------------------------------------------


class Supervisor:
    """The parent process: the node agent's channel, N workers, the node's telemetry.

    Implements :class:`ztunnel.inpod.channel.PodHandler` for the agent's messages.
    """

    def __init__(self, workers: int, argv_for: Any, *, drain_seconds: float = 20.0) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
        self.fanout = FanOut()
        self.lock = trio.Lock()
        self.workers = [Worker(i, argv_for) for i in range(workers)]
        self.drain_seconds = drain_seconds
        self.restarts = 0
        self.readiness = Readiness()
        self._joined = trio.Event()

    def joined_changed(self) -> None:
        self._joined.set()
        self._joined = trio.Event()

    async def wait_first_join(self, timeout: float = FIRST_JOIN_WAIT) -> None:
        """Until every worker is live (or ``timeout``, then at least one)."""
        with trio.move_on_after(timeout):
            while not all(w.live for w in self.workers):
                await self._joined.wait()
        while not any(w.live for w in self.workers):
            await self._joined.wait()

    # -- the agent's messages (PodHandler) -----------------------------------------------------
    async def _exchange(self, msg: Message, fd: int | None) -> None:
        async with self.lock:
            try:
                outgoing = self.fanout.forward(msg, fd)
            except ProtocolError:
                if fd is not None:
                    os.close(fd)
                raise
            waits: dict[int, list[Item]] = {}
            for w in self.workers:
                if not w.joined:
                    continue  # it gets the replay when it joins
                items = [w.enqueue(out) for out in outgoing]
                if w.live:  # a worker still replaying gets it in order, but is not waited for
                    waits[w.index] = items
            with trio.move_on_after(WORKER_ACK_TIMEOUT + 0.5):
                for items in waits.values():
                    for item in items:
                        await item.done.wait()
            results: dict[int, str | None | object] = {}
            for i, items in waits.items():
                if any(not it.done.is_set() for it in items):
                    # lock-step with it is lost: it drains and restarts, then gets the replay
                    log.warning("worker %d did not answer %s in time: restarting it",
                                i, type(msg).__name__)
                    self.workers[i].signal(signal.SIGTERM)
                    results[i] = GONE
                elif any(it.result is GONE for it in items):
                    results[i] = GONE
                else:
                    results[i] = next((it.result for it in items if isinstance(it.result, str)),
                                      None)
            error = aggregate(results, need_one=isinstance(msg, Add))
            settled = self.fanout.settle(msg, fd, error)
            for out in settled.rollback:
                for w in self.workers:
                    if w.joined:
                        w.enqueue(out)
            for old in settled.close_fds:
                try:
                    os.close(old)
                except OSError:
                    pass
        if error is not None:
            raise RuntimeError(error)

    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        msg = Add(pod.uid, pod.name, pod.namespace, pod.service_account)
        await self._exchange(msg, netns_fd)

    async def keep(self, uid: str) -> None:
        await self._exchange(Keep(uid), None)

    async def delete(self, uid: str) -> None:
        await self._exchange(Del(uid), None)

    async def snapshot_sent(self) -> None:
        await self._exchange(SnapshotSent(), None)
        self.readiness.set("cni snapshot", True)

    # -- telemetry -----------------------------------------------------------------------------
    async def _get(self, port: int, path: str) -> tuple[int, bytes]:
        with trio.fail_after(HTTP_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                conn = httpio.client_connection()
                await httpio.send_request(stream, conn, "GET", path, [("host", "127.0.0.1")])
                resp = await httpio.read_response(stream, conn, max_body=256 * 1024 * 1024)
                return resp.status, resp.body

    async def _ask_all(self, which: str, path: str) -> list[tuple[int, int, bytes] | None]:
        """GET ``path`` from every live worker's ``which`` port: (index, status, body) or None."""
        answers: list[tuple[int, int, bytes] | None] = [None] * len(self.workers)

        async def one(w: Worker) -> None:
            try:
                status, body = await self._get(w.ports[which], path)
                answers[w.index] = (w.index, status, body)
            except (OSError, trio.TooSlowError, httpio.HTTPError, KeyError) as e:
                log.debug("worker %d %s%s: %s", w.index, which, path, e)

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                if w.joined:
                    nursery.start_soon(one, w)
        return answers

    async def worker_readiness(self) -> list[str]:
        """Why the workers are not all ready (empty when they are)."""
        answers = await self._ask_all("ready", "/healthz/ready")
        reasons = []
        for w, a in zip(self.workers, answers, strict=True):
            if not w.live:
                reasons.append(f"worker {w.index}: {w.state}")
            elif a is None:
                reasons.append(f"worker {w.index}: readiness not answered")
            elif a[1] != 200:
                reasons.append(f"worker {w.index}: {a[2].decode(errors='replace').strip()}")
        return reasons

    def routes_ready(self) -> dict[str, Any]:
        async def ready(_: Request) -> Response:
            reasons = await self.worker_readiness()
            if self.readiness.ready and not reasons:
                return Response(200, b"ready")
            why = "; ".join(filter(None, [self.readiness.reason, *reasons]))
            return Response(503, f"not ready: {why}".encode())

        return {"/healthz/ready": ready}

    def own_metrics(self) -> str:
        live = sum(w.live for w in self.workers)
        return (
            "# HELP nodeproxy_ztunnel_workers Node proxy worker processes by state\n"
            "# TYPE nodeproxy_ztunnel_workers gauge\n"
            f'nodeproxy_ztunnel_workers{{state="live"}} {live}.0\n'
            f'nodeproxy_ztunnel_workers{{state="configured"}} {len(self.workers)}.0\n'
            "# HELP nodeproxy_ztunnel_worker_restarts_total Node proxy worker restarts\n"
            "# TYPE nodeproxy_ztunnel_worker_restarts_total counter\n"
            f"nodeproxy_ztunnel_worker_restarts_total {self.restarts}.0\n"
        )

    def routes_metrics(self) -> dict[str, Any]:
        async def metrics(_: Request) -> Response:
            answers = await self._ask_all("metrics", "/metrics")
            texts = [a[2].decode(errors="replace") for a in answers if a and a[1] == 200]
            body = merge_metrics(texts) + self.own_metrics()
            return Response(200, body.encode(), "text/plain; version=0.0.4; charset=utf-8")

        return {"/metrics": metrics, "/stats/prometheus": metrics}

    def routes_admin(self) -> dict[str, Any]:
        def page(path: str) -> Any:
            async def handler(_: Request) -> Response:
                answers = await self._ask_all("admin", path)
                parsed: list[tuple[int, Any]] = []
                for a in answers:
                    if a is None or a[1] != 200:
                        continue
                    try:
                        parsed.append((a[0], json.loads(a[2])))
                    except ValueError:
                        log.warning("worker %d: %s is not JSON", a[0], path)
                return json_response(merge_admin(path, parsed))

            return handler

        async def workers(_: Request) -> Response:
            return json_response([w.describe() for w in self.workers])

        routes: dict[str, Any] = {p: page(p) for p in (*STATE_PAGES, *LIST_PAGES, "/config_dump")}
        routes["/workers"] = workers
        return routes

    # -- the process -----------------------------------------------------------------------------
    async def run(
        self,
        agent_socket: str,
        *,
        admin: str,
        metrics: str,
        ready: str,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.readiness.set("cni snapshot", False, "waiting for the node agent's snapshot")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_http, admin, self.routes_admin())
                await nursery.start(serve_http, metrics, self.routes_metrics())
                await nursery.start(serve_http, ready, self.routes_ready())
                async with trio.open_nursery() as workers:
                    for w in self.workers:
                        workers.start_soon(w.run, self)
                    nursery.start_soon(self._on_signals, workers.cancel_scope, nursery)
                    # take the agent's pods only once workers can serve them
                    await self.wait_first_join()
                    nursery.start_soon(self._agent, agent_socket)
                    task_status.started()
        finally:
            for fd in self.fanout.close():
                try:
                    os.close(fd)
                except OSError:
                    pass

    async def _agent(self, agent_socket: str) -> None:
        await run_channel(agent_socket, self)

    async def _on_signals(self, workers: trio.CancelScope, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("signal %s: stopping %d workers", signal.Signals(sig).name,
                         len(self.workers))
                await self.stop(workers)
                nursery.cancel_scope.cancel()
                return

    async def stop(self, workers: trio.CancelScope) -> None:
        """SIGTERM every worker (each drains), wait for them, then stop serving."""
        self.readiness.set("draining", False, "shutting down")
        for w in self.workers:
            w.stopping = True
            w.signal(signal.SIGTERM)
        with trio.move_on_after(self.drain_seconds + 5):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        workers.cancel()  # their _reap kills whatever is left


def exec_supervisor(argv: Sequence[str]) -> None:
    """Become the supervisor (same pid, same process group): ``nodeproxy ztunnel`` validated
    ``argv``; a fresh interpreter that imports only this module holds ~7 MB less than one
    that loaded the whole node proxy."""
    from nodeproxy.telemetry.logs import flush_buffered_logs  # loaded already by the caller

    flush_buffered_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "ztunnel.workers", *argv])


def parser() -> argparse.ArgumentParser:
    """The options of ``nodeproxy ztunnel`` the supervisor uses (already checked there)."""
    p = argparse.ArgumentParser(prog="nodeproxy ztunnel --workers N")
    p.add_argument("--node", required=True)
    p.add_argument("--controlplane", required=True)
    p.add_argument("--ca-root", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--agent-socket", required=True)
    p.add_argument("--admin", default="127.0.0.1:15000")
    p.add_argument("--metrics", default="0.0.0.0:15020")
    p.add_argument("--ready", default="0.0.0.0:15021")
    p.add_argument("--drain-seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, required=True)
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    """``nodeproxy ztunnel --workers N`` (N > 1): the supervisor process."""

    def argv_for(index: int, fd: int) -> list[str]:
        return worker_argv(args, index, fd)

    sup = Supervisor(args.workers, argv_for, drain_seconds=args.drain_seconds)
    try:
        trio.run(
            lambda: sup.run(args.agent_socket, admin=args.admin, metrics=args.metrics,
                            ready=args.ready)
        )
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
