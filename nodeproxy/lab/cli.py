"""``nodeproxy lab …``: up, status, exec, logs, down, and the runtime helpers.

``up`` validates the file, takes the lab's lock, starts the supervisor detached (it inherits
the lock, which is how a second ``up`` knows one runs) and waits until the lab runs or
failed. Every other command talks to the supervisor over its Unix socket, except ``exec``
and ``logs`` (plain files and namespaces) and ``down``, which also works when the supervisor
is gone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodeproxy.lab import network
from nodeproxy.lab.paths import LabPaths
from nodeproxy.lab.spec import LabSpecError, node_netns, parse_lab, pod_netns, vm_netns

UP_TIMEOUT = float(os.environ.get("NODEPROXY_LAB_UP_TIMEOUT", "300"))
DOWN_TIMEOUT = 150.0


class CLIError(Exception):
    pass


# -- the supervisor's liveness and socket ------------------------------------------------


def lock_held(paths: LabPaths) -> bool:
    """True while a supervisor holds the lab's lock."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def supervisor_pid(paths: LabPaths) -> int | None:
    try:
        return int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def request(paths: LabPaths, req: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(paths.control_socket))
        except OSError as e:
            raise CLIError(f"no lab running in {paths.root} ({e.strerror})") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise CLIError("the lab supervisor did not answer in time") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise CLIError("the lab supervisor gave no answer (did it exit?)") from None
    if not reply.get("ok"):
        raise CLIError(reply.get("error", "request failed"))
    return reply


# -- up ----------------------------------------------------------------------------------


def cmd_up(paths: LabPaths, file: str) -> int:
    try:
        text = Path(file).read_text()
    except OSError as e:
        print(f"cannot read {file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        spec = parse_lab(text, file)
    except LabSpecError as e:
        print(f"invalid lab file: {e}", file=sys.stderr)
        return 2
    paths.root.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = supervisor_pid(paths)
            print(
                f"a lab is already running (lab dir {paths.root}, supervisor pid {pid}); "
                "run `nodeproxy lab down` first",
                file=sys.stderr,
            )
            return 1
        leftovers = network.list_netns(paths.prefix)
        extra = [p.name for p in paths.root.iterdir() if p.name != "lock"]
        if leftovers or extra:
            what = ", ".join(leftovers + [str(paths.root / e) for e in extra][:5])
            print(
                f"leftovers of an earlier lab found ({what}); run `nodeproxy lab down` "
                "to remove them",
                file=sys.stderr,
            )
            return 1
        paths.lab_file.write_text(text)
        (paths.root / "config.json").write_text(
            json.dumps({"prefix": paths.prefix, "lab_dir": str(paths.root)})
        )
        paths.logs.mkdir(exist_ok=True)
        with open(paths.log("supervisor"), "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nodeproxy.lab.supervisor", str(paths.root)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(lock_fd,),  # the supervisor holds the lock from now on
                cwd="/",
            )
    finally:
        os.close(lock_fd)
    print(
        f"lab starting: {len(spec.nodes)} nodes, {len(spec.resources.pods)} pods"
        + (f", {len(spec.vms)} VMs" if spec.vms else "")
        + f" (supervisor pid {proc.pid}, lab dir {paths.root})"
    )
    return wait_up(paths, proc)


def wait_up(paths: LabPaths, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + UP_TIMEOUT
    last_step = ""
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = f"the lab supervisor exited with status {proc.returncode}"
            tail = _tail(paths.log("supervisor"))
            print(f"lab failed: {err}\n{tail}", file=sys.stderr)
            cmd_down(paths, quiet=True)
            return 1
        try:
            status = request(paths, {"op": "status"}, timeout=10)["status"]
        except CLIError:
            time.sleep(0.2)
            continue
        if status["step"] != last_step:
            last_step = status["step"]
            print(f"  {last_step}")
        if status["phase"] == "running":
            print_status(status)
            return 0
        if status["phase"] == "failed":
            print(f"lab failed: {status['error']}", file=sys.stderr)
            print("tearing down…", file=sys.stderr)
            cmd_down(paths, quiet=True)
            return 1
        time.sleep(0.2)
    print(f"lab failed: not running after {UP_TIMEOUT:.0f} s (step: {last_step})",
          file=sys.stderr)
    cmd_down(paths, quiet=True)
    return 1


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- status ------------------------------------------------------------------------------


def print_status(st: dict[str, Any]) -> None:
    print(f"lab {st['phase']}  (dir {st['lab_dir']}, prefix {st['prefix']}, "
          f"mesh {'on' if st['mesh'] else 'off'})")
    if st.get("error"):
        print(f"  error: {st['error']}")
    u = st["underlay"]
    print(f"underlay  {u['netns']}  {u['ip']}  {_components(u['components'])}")
    print("nodes:")
    for n in st["nodes"]:
        print(f"  {n['name']:<12} {n['netns']:<24} {n['underlay_ip']:<12} {n['pod_cidr']:<15} "
              f"{_components(n['components'])}")
    print("pods:")
    for p in st["pods"]:
        state = p["state"] + (f"({p['exit_code']})" if p["state"] == "exited" else "")
        print(f"  {p['namespace'] + '/' + p['name']:<24} {p['ip'] or '-':<13} {p['node']:<10} "
              f"{state:<10} {'meshed' if p['meshed'] else 'not meshed':<11} {p['netns']}")
    if st.get("vms"):
        print("vms:")
        for v in st["vms"]:
            app = v.get("app") or {}
            state = app.get("state", "-") + (
                f"({app['exit_code']})" if app.get("state") == "exited" else ""
            )
            print(f"  {v['namespace'] + '/' + v['name']:<24} {v['ip']:<13} "
                  f"app={state:<10} {_components(v['components'])}  {v['netns']}")
    if st.get("services"):
        print("services:")
        for s in st["services"]:
            ports = ",".join(str(p) for p in s["ports"])
            print(f"  {s['namespace'] + '/' + s['name']:<24} {s['cluster_ip']}:{ports}")


def _components(comps: dict[str, Any]) -> str:
    return "  ".join(
        f"{name}={c['state']}" + (f"({c['exit_code']})" if c["state"] == "exited" else "")
        for name, c in comps.items()
    )


def cmd_status(paths: LabPaths, as_json: bool) -> int:
    try:
        st = request(paths, {"op": "status"}, timeout=10)["status"]
    except CLIError as e:
        # the supervisor is gone: show what it last wrote, if anything
        try:
            st = json.loads(paths.status_file.read_text())
            st["phase"] = f"supervisor gone (was {st['phase']})"
        except (OSError, ValueError):
            if as_json:
                print(json.dumps({"phase": "down", "error": str(e)}))
            else:
                print(str(e), file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        print_status(st)
    return 0


# -- exec / logs -------------------------------------------------------------------------


def cmd_exec(paths: LabPaths, target: str, cmd: list[str]) -> int:
    if not cmd:
        print("exec: give a command after --", file=sys.stderr)
        return 2
    ns_name, _, name = target.partition("/")
    if not ns_name or not name:
        print("exec: target is NAMESPACE/POD, node/NODE or vm/VM", file=sys.stderr)
        return 2
    if ns_name == "node":
        netns = node_netns(paths.prefix, name)
    elif ns_name == "vm":
        netns = vm_netns(paths.prefix, name)
    else:
        netns = pod_netns(paths.prefix, ns_name, name)
    if not (network.NETNS_DIR / netns).exists():
        print(f"exec: no {target} in the lab (netns {netns} missing)", file=sys.stderr)
        return 1
    try:
        return subprocess.call(network.netns_exec(netns, cmd))
    except KeyboardInterrupt:
        return 130


def cmd_logs(paths: LabPaths, component: str) -> int:
    path = paths.log(component)
    if "/" in component or not path.exists():
        known = sorted(p.stem for p in paths.logs.glob("*.log")) if paths.logs.is_dir() else []
        print(f"no log {component!r}; known: {', '.join(known) or 'none'}", file=sys.stderr)
        return 1
    with open(path, "rb") as f:
        while chunk := f.read(65536):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return 0


# -- down --------------------------------------------------------------------------------


def cmd_down(paths: LabPaths, quiet: bool = False) -> int:
    pid = supervisor_pid(paths)
    if pid is not None and lock_held(paths) and network.pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT
        while time.monotonic() < deadline and network.pid_alive(pid):
            time.sleep(0.1)
        if network.pid_alive(pid):
            print(f"supervisor {pid} did not stop in time: killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
    elif pid is not None and network.pid_alive(pid) and not lock_held(paths):
        pass  # a reused pid: not ours
    removed = network.sweep(paths.prefix, paths.root if paths.root.exists() else None)
    if not quiet:
        if removed:
            print("lab removed (swept: " + ", ".join(removed) + ")")
        else:
            print("lab removed")
    return 0


# -- runtime helpers ---------------------------------------------------------------------


def cmd_request(paths: LabPaths, req: dict[str, Any]) -> int:
    try:
        reply = request(paths, req)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    print(json.dumps(reply))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeproxy lab", description="a cluster on one machine")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab described in FILE")
    up.add_argument("file")
    st = sub.add_parser("status", help="nodes, components and pods")
    st.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command in NAMESPACE/POD, node/NODE or vm/VM")
    ex.add_argument("target")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    lg = sub.add_parser("logs", help="print a component's log")
    lg.add_argument("component")
    sub.add_parser("down", help="remove the lab (also after a crash)")
    ap = sub.add_parser("apply", help="add or replace resources at runtime")
    ap.add_argument("file")
    de = sub.add_parser("delete", help="delete one resource")
    de.add_argument("kind", help="pod, service, namespace, authorizationpolicy, httproute")
    de.add_argument("ref", help="NAMESPACE/NAME (a namespace: NAME)")
    la = sub.add_parser("label", help="change a namespace's labels")
    la.add_argument("kind", choices=["namespace", "ns"])
    la.add_argument("name")
    la.add_argument("changes", nargs="+", help="key=value or key-")
    rs = sub.add_parser("restart", help="restart a component or a pod's command")
    rs.add_argument("component")
    ca = sub.add_parser("capture", help="tcpdump on the underlay bridge")
    ca.add_argument("action", choices=["start", "stop"])
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    paths = LabPaths.from_env()
    if os.geteuid() != 0 and args.cmd not in ("logs",):
        print("nodeproxy lab needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.cmd == "up":
        return cmd_up(paths, args.file)
    if args.cmd == "status":
        return cmd_status(paths, args.json)
    if args.cmd == "exec":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        return cmd_exec(paths, args.target, cmd)
    if args.cmd == "logs":
        return cmd_logs(paths, args.component)
    if args.cmd == "down":
        return cmd_down(paths)
    if args.cmd == "apply":
        try:
            text = Path(args.file).read_text()
        except OSError as e:
            print(f"cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 2
        return cmd_request(paths, {"op": "apply", "text": text, "source": args.file})
    if args.cmd == "delete":
        return cmd_request(paths, {"op": "delete", "kind": args.kind, "ref": args.ref})
    if args.cmd == "label":
        return cmd_request(paths, {"op": "label", "namespace": args.name,
                                   "changes": args.changes})
    if args.cmd == "restart":
        return cmd_request(paths, {"op": "restart", "component": args.component})
    if args.cmd == "capture":
        return cmd_request(paths, {"op": "capture", "action": args.action})
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
