"""The CNI node agent: enrols this node's pods in the mesh and hands them to the node proxy.

Three inputs drive it:

- the CNI plugin (Unix stream socket, one JSON line each way): ADD/DEL/CHECK/STATUS of a pod
  sandbox;
- the mesh state (the discovery client): whether each pod is meshed; changes enrol or release
  running pods without a restart;
- the node proxy (Unix SOCK_SEQPACKET, :mod:`nodeproxy.inpod_protocol`): on every connection
  the agent replays Add for every enrolled pod and then SnapshotSent.

Order of an enrolment: capture rules in the pod netns, then Add (with the netns fd) to the node
proxy and its ack, and only then ``ok`` to the plugin; if the proxy is absent or refuses, the
rules are removed again and the plugin gets code 11, so no pod runs captured without a proxy
behind the capture, and no meshed pod starts uncaptured. What the agent knows about its pods is
kept in ``STATE_DIR/pods.json`` so a restarted agent still knows them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from cni import enrol, netprog
from cni.enrol import Action, PodRecord
from nodeproxy import inpod_protocol as protocol
from nodeproxy.inpod_protocol import (
    Ack,
    Add,
    ChannelClosed,
    Del,
    Hello,
    ProtocolError,
    SnapshotSent,
)
from nodeproxy.model import MeshState, Workload

log = logging.getLogger(__name__)

MESH_WAIT = 8.0  # ADD waits this long for the control plane to know the pod (plugin waits 15)
HELLO_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0
RETRY_INTERVAL = 30.0  # reconcile at least this often (enrolments that failed are retried)
MAX_REQUEST = 64 * 1024
STATE_FILE = "pods.json"

# CNI codes the agent answers with (see cni.plugin)
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50


class MeshSource(Protocol):
    """What the agent needs of the discovery client (nodeproxy.discovery.DiscoveryClient)."""

    state: MeshState
    ready: trio.Event

    async def wait_changed(self, version: int) -> MeshState: ...


class AgentError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg


class ProxyLink:
    """One connected node proxy: lock-step exchanges, a reader task that collects acks."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.closed = trio.Event()
        self._lock = trio.Lock()
        self._acks_send, self._acks_recv = trio.open_memory_channel[Ack](1)

    async def read_loop(self) -> None:
        """Deliver acks to the sender; anything else, or EOF, ends the link."""
        try:
            while True:
                msg, fd = await protocol.recv_msg(self.sock)
                if fd is not None:
                    os.close(fd)
                if not isinstance(msg, Ack):
                    raise ProtocolError(f"unexpected {type(msg).__name__} from the node proxy")
                try:
                    self._acks_send.send_nowait(msg)
                except trio.WouldBlock:
                    raise ProtocolError("ack without a request") from None
        except ChannelClosed:
            log.info("node proxy disconnected")
        except (ProtocolError, OSError, trio.ClosedResourceError) as e:
            log.warning("node proxy channel broken: %s", e)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self._acks_send.close()
            self.sock.close()

    async def send(self, msg: protocol.Message, fd: int | None = None) -> None:
        """One exchange. :class:`protocol.Refused` on nack; :class:`ChannelClosed` otherwise."""
        async with self._lock:
            if self.closed.is_set():
                raise ChannelClosed("node proxy not connected")
            try:
                with trio.fail_after(protocol.ACK_TIMEOUT):
                    await protocol.send_msg(self.sock, msg, fd)
                    ack = await self._acks_recv.receive()
            except trio.TooSlowError:
                self.close()  # lock-step is lost: a late ack would answer the next message
                raise ChannelClosed(f"no ack for {type(msg).__name__}") from None
            except (ProtocolError, OSError, trio.ClosedResourceError, trio.EndOfChannel) as e:
                self.close()
                raise ChannelClosed(f"node proxy channel broken: {e}") from None
        if ack.error is not None:
            raise protocol.Refused(f"node proxy refused {type(msg).__name__}: {ack.error}")


class Agent:
    """The node agent's state and behaviour; :meth:`run` serves both sockets."""

    def __init__(
        self,
        *,
        node: str,
        state_dir: str,
        mesh: MeshSource,
        mesh_wait: float = MESH_WAIT,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.node = node
        self.state_dir = Path(state_dir)
        self.mesh = mesh
        self.mesh_wait = mesh_wait
        self.retry_interval = retry_interval
        self.pods: dict[str, PodRecord] = {}  # by container (sandbox) id
        self.lock = trio.Lock()  # one pod mutation at a time
        self._proxy: ProxyLink | None = None
        self._kick = trio.Event()
        self.reconciled = 0  # how many reconcile passes ran (for status and tests)

    # -- persisted state -----------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def load(self) -> None:
        """Read the state file; pods whose netns is gone are dropped."""
        try:
            raw = json.loads(self.state_path.read_text())
            pods = [PodRecord.from_json(p) for p in raw.get("pods", [])]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as e:
            bad = self.state_path.with_suffix(".corrupt")
            log.error("state file %s unreadable (%s); moved to %s", self.state_path, e, bad)
            try:
                os.replace(self.state_path, bad)
            except OSError:
                pass
            return
        for p in pods:
            if netprog.is_netns(p.netns):
                self.pods[p.container_id] = p
            else:
                log.info("pod %s/%s: netns gone while the agent was down", p.namespace, p.name)
        log.info("loaded %d pods from %s", len(self.pods), self.state_path)

    def save(self) -> None:
        # small file, written rarely and under the pod lock: a direct write is fine
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        body = {"version": 1, "node": self.node, "pods": [p.to_json() for p in self.pods.values()]}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.state_path)

    # -- the node proxy --------------------------------------------------------------------
    @property
    def proxy(self) -> ProxyLink | None:
        link = self._proxy
        return link if link is not None and not link.closed.is_set() else None

    async def _send_add(self, link: ProxyLink, rec: PodRecord) -> None:
        fd = os.open(rec.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            add = Add(rec.proxy_uid or rec.uid, rec.name, rec.namespace, rec.service_account)
            await link.send(add, fd)
        finally:
            os.close(fd)  # the proxy got its own copy through SCM_RIGHTS

    async def serve_proxy(self, sock: trio.socket.SocketType) -> None:
        """One node proxy connection: Hello, replay, SnapshotSent, then acks until it ends."""
        with sock:
            try:
                with trio.fail_after(HELLO_TIMEOUT):
                    hello, fd = await protocol.recv_msg(sock)
            except (ProtocolError, OSError, trio.TooSlowError) as e:
                log.warning("node proxy connection without a valid hello: %r", e)
                return
            if fd is not None:
                os.close(fd)
            if not isinstance(hello, Hello) or hello.version != protocol.VERSION:
                log.warning("node proxy sent %r instead of hello v%d", hello, protocol.VERSION)
                return
            link = ProxyLink(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.read_loop)
                await self._install(link)
                await link.closed.wait()
                nursery.cancel_scope.cancel()
            if self._proxy is link:
                self._proxy = None

    async def _install(self, link: ProxyLink) -> None:
        async with self.lock:
            old, self._proxy = self._proxy, link
            if old is not None:
                log.info("a new node proxy connected: replacing the old connection")
                old.close()
            try:
                for rec in sorted(self.pods.values(), key=lambda p: (p.namespace, p.name)):
                    if not rec.enrolled or not netprog.is_netns(rec.netns):
                        continue
                    try:
                        await self._send_add(link, rec)
                    except (protocol.Refused, OSError) as e:
                        # the capture stays: the pod fails closed until the proxy takes it
                        log.error("replay of %s/%s refused: %s", rec.namespace, rec.name, e)
                await link.send(SnapshotSent())
            except ChannelClosed as e:
                log.warning("node proxy went away during the replay: %s", e)
                return
        log.info(
            "node proxy connected; snapshot of %d pods sent",
            sum(p.enrolled for p in self.pods.values()),
        )
        self._kick.set()  # pods that waited for a proxy can be enrolled now

    # -- enrol / release ---------------------------------------------------------------------
    async def _undo(self, netns: str) -> None:
        try:
            await netprog.unprogram_pod(netns)
        except netprog.NetprogError as e:
            log.error("could not remove the capture from %s: %s", netns, e)

    async def _enrol(self, rec: PodRecord, workload: Workload) -> PodRecord:
        """Capture the pod and hand it to the node proxy; raise :class:`AgentError` (undone)."""
        rec = rec.with_(proxy_uid=workload.uid or rec.uid, service_account=workload.service_account)
        link = self.proxy
        if link is None:
            raise AgentError(TRY_AGAIN_LATER, "node proxy not connected")
        try:
            await netprog.program_pod(rec.netns)
        except netprog.NetprogError as e:
            await self._undo(rec.netns)
            raise AgentError(IO_FAILURE, f"programming the pod netns failed: {e}") from None
        try:
            await self._send_add(link, rec)
        except (ProtocolError, OSError) as e:
            await self._undo(rec.netns)
            raise AgentError(TRY_AGAIN_LATER, f"node proxy did not take the pod: {e}") from None
        log.info("pod %s/%s enrolled", rec.namespace, rec.name)
        return rec.with_(enrolled=True)

    async def _release(self, rec: PodRecord) -> PodRecord:
        """Remove the capture and tell the proxy (best-effort: the capture goes first)."""
        await self._undo(rec.netns)
        link = self.proxy
        if rec.enrolled and link is not None:
            try:
                await link.send(Del(rec.proxy_uid or rec.uid))
            except ProtocolError as e:
                log.warning("node proxy Del of %s/%s: %s", rec.namespace, rec.name, e)
        if rec.enrolled:
            log.info("pod %s/%s released", rec.namespace, rec.name)
        return rec.with_(enrolled=False, proxy_uid="")

    async def reconcile(self) -> None:
        """Bring every known pod in line with the mesh state (enrol.py decides)."""
        async with self.lock:
            for cid, rec in list(self.pods.items()):
                if not netprog.is_netns(rec.netns):
                    log.info("pod %s/%s: netns gone; forgetting it", rec.namespace, rec.name)
                    await self._release(rec)
                    del self.pods[cid]
            for d in enrol.decide(self.mesh.state, self.pods.values()):
                cid = d.pod.container_id
                if d.action is Action.ENROL and d.workload is not None:
                    if self.proxy is None:
                        continue  # enrolled when the proxy connects (it kicks us)
                    try:
                        self.pods[cid] = await self._enrol(d.pod, d.workload)
                    except AgentError as e:
                        log.warning("enrolling %s/%s: %s", d.pod.namespace, d.pod.name, e.msg)
                elif d.action is Action.RELEASE:
                    self.pods[cid] = await self._release(d.pod)
            self.save()
            self.reconciled += 1

    # -- CNI plugin requests -------------------------------------------------------------------
    async def _wait_workload(self, namespace: str, name: str, uid: str) -> Workload | None:
        with trio.move_on_after(self.mesh_wait):
            await self.mesh.ready.wait()
            while True:
                state = self.mesh.state
                w = enrol.find_workload(state, namespace, name, uid)
                if w is not None:
                    return w
                await self.mesh.wait_changed(state.version)
        return None

    async def handle_request(self, req: Any) -> dict[str, Any]:
        """One plugin request → reply (never raises)."""
        try:
            if not isinstance(req, dict):
                raise AgentError(INVALID_ENV, "request is not a JSON object")
            command = req.get("command")
            handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
                "ADD": self._add,
                "DEL": self._del,
                "CHECK": self._check,
                "STATUS": self._status,
            }
            if command not in handlers:
                raise AgentError(INVALID_ENV, f"unknown command {command!r}")
            await handlers[command](req)
            return {"ok": True}
        except AgentError as e:
            log.warning("%s: code %d: %s", _describe(req), e.code, e.msg)
            return {"ok": False, "code": e.code, "msg": e.msg}
        except Exception as e:  # a bug: fail closed, keep serving
            log.exception("%s: internal error", _describe(req))
            return {"ok": False, "code": TRY_AGAIN_LATER, "msg": f"agent internal error: {e!r}"}

    @staticmethod
    def _record(req: dict[str, Any], *, need_netns: bool) -> PodRecord:
        def field(name: str, required: bool) -> str:
            value = req.get(name, "")
            if not isinstance(value, str) or (required and not value):
                raise AgentError(INVALID_ENV, f"{name} must be a non-empty string")
            return value

        ips = req.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise AgentError(INVALID_ENV, "ips must be a list of strings")
        return PodRecord(
            container_id=field("container_id", True),
            namespace=field("pod_namespace", need_netns),
            name=field("pod_name", need_netns),
            uid=field("pod_uid", False),
            netns=field("netns", need_netns),
            ips=tuple(ips),
        )

    async def _add(self, req: dict[str, Any]) -> None:
        rec = self._record(req, need_netns=True)
        if not netprog.is_netns(rec.netns):
            raise AgentError(INVALID_ENV, f"{rec.netns!r} is not a network namespace")
        workload = await self._wait_workload(rec.namespace, rec.name, rec.uid)
        if workload is None:
            raise AgentError(
                TRY_AGAIN_LATER,
                f"pod {rec.namespace}/{rec.name} not known to the control plane yet",
            )
        async with self.lock:
            old = self.pods.get(rec.container_id)
            if old is not None:  # a repeated ADD of the same sandbox
                rec = rec.with_(enrolled=old.enrolled, proxy_uid=old.proxy_uid)
            rec = rec.with_(service_account=workload.service_account)
            # recorded before touching the netns, so a crash in between leaves a trace
            self.pods[rec.container_id] = rec
            self.save()
            try:
                if workload.meshed:
                    rec = await self._enrol(rec, workload)
                elif rec.enrolled:
                    rec = await self._release(rec)
            except AgentError:
                # the runtime tears this sandbox down and retries with a new one
                del self.pods[rec.container_id]
                self.save()
                raise
            self.pods[rec.container_id] = rec
            self.save()
        log.info(
            "ADD %s/%s (%s): %s",
            rec.namespace,
            rec.name,
            rec.container_id[:12],
            "meshed" if rec.enrolled else "not meshed",
        )

    async def _del(self, req: dict[str, Any]) -> None:
        given = self._record(req, need_netns=False)
        async with self.lock:
            rec = self.pods.get(given.container_id)
            if rec is None:
                # unknown sandbox (or a repeated DEL): still make sure no capture is left
                if given.netns:
                    await self._undo(given.netns)
                return
            await self._release(rec)
            del self.pods[rec.container_id]
            self.save()

    async def _check(self, req: dict[str, Any]) -> None:
        given = self._record(req, need_netns=True)
        rec = self.pods.get(given.container_id)
        if rec is None:
            raise AgentError(UNKNOWN_CONTAINER, f"unknown container {given.container_id}")
        if rec.enrolled and not await netprog.is_programmed(rec.netns):
            raise AgentError(IO_FAILURE, "capture rules missing from the pod netns")

    async def _status(self, req: dict[str, Any]) -> None:
        if not self.mesh.ready.is_set():
            raise AgentError(PLUGIN_NOT_AVAILABLE, "no mesh state from the control plane yet")

    async def serve_plugin_stream(self, stream: trio.SocketStream) -> None:
        """One plugin connection: a JSON line in, a JSON line out; never raises."""
        req: Any = None
        try:
            async with stream:
                buf = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        buf += chunk
                try:
                    req = json.loads(buf.split(b"\n", 1)[0])
                except (ValueError, UnicodeDecodeError):
                    reply: dict[str, Any] = {"ok": False, "code": 6, "msg": "request is not JSON"}
                    log.warning("plugin sent an undecodable request (%d bytes)", len(buf))
                else:
                    reply = await self.handle_request(req)
                await stream.send_all((json.dumps(reply) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.warning("plugin connection for %s failed: %s", _describe(req), e)

    # -- running -------------------------------------------------------------------------------
    async def _watch_mesh(self) -> None:
        await self.mesh.ready.wait()
        version = self.mesh.state.version
        self._kick.set()
        while True:
            state = await self.mesh.wait_changed(version)
            version = state.version
            self._kick.set()

    async def _reconcile_loop(self) -> None:
        while True:
            with trio.move_on_after(self.retry_interval):
                await self._kick.wait()
            self._kick = trio.Event()
            if self.mesh.ready.is_set():
                try:
                    await self.reconcile()
                except Exception:  # a bug must not stop the agent; the next pass retries
                    log.exception("reconcile failed")

    async def run(
        self,
        plugin_socket: str,
        ztunnel_socket: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.load()
        plugin_sock = await _unix_listener(plugin_socket, socket.SOCK_STREAM)
        ztunnel_sock = await _unix_listener(ztunnel_socket, socket.SOCK_SEQPACKET)
        with plugin_sock, ztunnel_sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_proxies, ztunnel_sock)
                nursery.start_soon(
                    trio.serve_listeners,
                    self.serve_plugin_stream,
                    [trio.SocketListener(plugin_sock)],
                )
                nursery.start_soon(self._watch_mesh)
                nursery.start_soon(self._reconcile_loop)
                log.info(
                    "node agent for %s: plugin socket %s, node proxy socket %s",
                    self.node,
                    plugin_socket,
                    ztunnel_socket,
                )
                task_status.started()

    async def _accept_proxies(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as e:  # e.g. out of fds: wait, do not die
                    log.error("accepting a node proxy connection: %s", e)
                    await trio.sleep(1)
                    continue
                nursery.start_soon(self._serve_proxy_logged, conn)

    async def _serve_proxy_logged(self, sock: trio.socket.SocketType) -> None:
        try:
            await self.serve_proxy(sock)
        except Exception:
            log.exception("node proxy connection failed")


def _describe(req: Any) -> str:
    if isinstance(req, dict):
        return f"{req.get('command')} {req.get('pod_namespace')}/{req.get('pod_name')}"
    return "request"


async def _unix_listener(path: str, kind: int) -> trio.socket.SocketType:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)  # a stale socket of an earlier agent
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, kind)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)  # only root (the runtime and the node proxy) may talk to us
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_agent(
    *,
    node: str,
    plugin_socket: str,
    ztunnel_socket: str,
    state_dir: str,
    mesh: MeshSource,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node agent until cancelled."""
    agent = Agent(node=node, state_dir=state_dir, mesh=mesh)
    await agent.run(plugin_socket, ztunnel_socket, task_status=task_status)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nodeproxy cni-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--controlplane", required=True, help="HOST:PORT of the control plane")
    parser.add_argument("--ca-root", required=True, type=Path)
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--plugin-socket", required=True)
    parser.add_argument("--ztunnel-socket", required=True)
    parser.add_argument("--state-dir", default="/var/lib/nodeproxy/cni")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from nodeproxy.discovery import DiscoveryClient, TokenFile  # heavier: import late

        roots = args.ca_root.read_bytes()
        token = TokenFile(args.token_file)  # re-read as it rotates
    except (OSError, ValueError) as e:
        log.error("cannot read credentials: %s", e)
        return 2

    try:
        client = DiscoveryClient(args.controlplane, roots, token)
    except Exception as e:  # bad CA file or address: a clear message, not a traceback
        log.error("cannot set up the discovery client: %s", e)
        return 2

    async def _stop_on_signal(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                scope.cancel()
                return

    async def _main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(client.run)
            await run_agent(
                node=args.node,
                plugin_socket=args.plugin_socket,
                ztunnel_socket=args.ztunnel_socket,
                state_dir=args.state_dir,
                mesh=client,
            )

    trio.run(_main)
    return 0
