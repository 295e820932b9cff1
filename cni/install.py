"""The CNI installer: puts ``nodeproxy-cni`` into the node's CNI set-up and keeps it there.

What the node agent's installer does at start-up on a Kubernetes node (istio-cni's
``install-cni`` does the same for Istio):

1. copy the plugin binary into the CNI bin dir (``/opt/cni/bin``), atomically, mode 0755;
2. find the node's primary CNI configuration the way the container runtime does (libcni): the
   first valid file of ``/etc/cni/net.d`` sorted by name (``*.conflist``, ``*.conf``,
   ``*.json``); a ``.conflist`` needs a ``name`` and a non-empty ``plugins`` list, a ``.conf`` or
   ``.json`` a ``type``;
3. append our chained plugin at the end of its ``plugins`` (a single-plugin ``.conf`` becomes a
   ``.conflist`` and the old file is removed), written atomically (temp file + ``os.replace``);
4. with ``--watch``, keep polling the directory and re-insert the plugin whenever another agent
   (the primary CNI's own daemon, typically) rewrites the file or a new primary file appears.

The decisions (:func:`is_valid_config`, :func:`choose_primary`, :func:`plan_insert`,
:func:`plan_remove`) are pure; :func:`install`, :func:`uninstall` and :func:`watch_and_repair`
do the IO. The plugin is never removed on exit unless asked: a pod started while the agent is
away must fail closed (the plugin answers "try again later"), not start without its capture.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import zipapp
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

PLUGIN_TYPE = "nodeproxy-cni"
BINARY_NAME = "nodeproxy-cni"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_AGENT_SOCKET = "/var/run/nodeproxy/cni-plugin.sock"
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
MAX_CONFIG_SIZE = 1 << 20  # a CNI config is a few KiB; refuse to parse anything absurd
UNINSTALL_ENV = "NODEPROXY_CNI_UNINSTALL_ON_EXIT"


class InstallError(Exception):
    """The installation cannot proceed (no primary config, unreadable directory, …)."""


class NoPrimaryConfig(InstallError):
    """The conf dir holds no valid CNI configuration (yet)."""


@dataclass(frozen=True)
class Settings:
    """What goes into our plugin entry."""

    agent_socket: str = DEFAULT_AGENT_SOCKET
    log_file: str | None = None

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": PLUGIN_TYPE, "agentSocket": self.agent_socket}
        if self.log_file:
            out["logFile"] = self.log_file
        return out


@dataclass(frozen=True)
class Plan:
    """File operations for one change of the conf dir: write ``write_name`` (unless ``None``)
    with ``content``, then remove ``remove_name`` (unless ``None``)."""

    write_name: str | None
    content: bytes = b""
    remove_name: str | None = None

    @property
    def changed(self) -> bool:
        return self.write_name is not None or self.remove_name is not None


# ---------------------------------------------------------------------------------------------
# sans-IO core


def parse_config(name: str, data: bytes) -> tuple[dict[str, Any] | None, str]:
    """Decode one candidate file. Returns ``(config, "")`` if the runtime would use it, else
    ``(None, reason)``."""
    if not name.endswith(CONFIG_SUFFIXES):
        return None, "not a CNI config file name"
    if len(data) > MAX_CONFIG_SIZE:
        return None, "file too big"
    try:
        conf = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"invalid JSON: {e}"
    if not isinstance(conf, dict):
        return None, "not a JSON object"
    if name.endswith(".conflist"):
        # libcni ConfListFromBytes: a name and at least one plugin, each with a type
        if not isinstance(conf.get("name"), str) or not conf["name"]:
            return None, "conflist without a name"
        plugins = conf.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            return None, "conflist without plugins"
        if not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
            return None, "a plugin without a type"
        return conf, ""
    # libcni ConfFromBytes + the runtimes' "network type not found" check
    if not isinstance(conf.get("type"), str) or not conf["type"]:
        return None, "config without a type"
    return conf, ""


def is_valid_config(name: str, data: bytes) -> bool:
    return parse_config(name, data)[0] is not None


def choose_primary(files: Mapping[str, bytes]) -> tuple[str, dict[str, Any]]:
    """The first valid config by file name, as the runtime picks it (raises NoPrimaryConfig)."""
    reasons = []
    for name in sorted(files):
        if not name.endswith(CONFIG_SUFFIXES):
            continue
        conf, why = parse_config(name, files[name])
        if conf is not None:
            return name, conf
        reasons.append(f"{name}: {why}")
    detail = "; ".join(reasons) if reasons else "no *.conflist, *.conf or *.json file"
    raise NoPrimaryConfig(f"no valid CNI configuration ({detail})")


def render(conf: Mapping[str, Any]) -> bytes:
    return (json.dumps(conf, indent=2) + "\n").encode()


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def with_plugin(conf: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """A conflist (JSON object) with our entry last and only once; the rest kept as it was."""
    out = dict(conf)
    plugins = [p for p in conf["plugins"] if not _is_ours(p)]
    out["plugins"] = plugins + [settings.entry()]
    return out


def to_conflist(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A single-plugin ``.conf`` as a conflist: ``cniVersion``/``name`` lifted to the list."""
    out: dict[str, Any] = {}
    if "cniVersion" in conf:
        out["cniVersion"] = conf["cniVersion"]
    out["name"] = conf.get("name") or conf["type"]
    out["plugins"] = [{k: v for k, v in conf.items() if k not in ("cniVersion", "name")}]
    return out


def conflist_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return stem + ".conflist"


def plan_insert(files: Mapping[str, bytes], settings: Settings) -> Plan:
    """What to write so that the primary config chains our plugin (no-op if it already does)."""
    name, conf = choose_primary(files)
    if name.endswith(".conflist"):
        new = with_plugin(conf, settings)
        if new == conf:
            return Plan(None)
        return Plan(name, render(new))
    new_name = conflist_name(name)
    # "x.conflist" sorts right after "x.conf": the new file takes the old one's place as the
    # primary. A file already there is overwritten (istio-cni does the same).
    return Plan(new_name, render(with_plugin(to_conflist(conf), settings)), remove_name=name)


def plan_remove(name: str, data: bytes) -> Plan:
    """Remove our entries from one file (no-op if it holds none or is not a valid conflist)."""
    conf, _ = parse_config(name, data)
    if conf is None or not name.endswith(".conflist"):
        return Plan(None)
    plugins = [p for p in conf["plugins"] if not _is_ours(p)]
    if len(plugins) == len(conf["plugins"]):
        return Plan(None)
    if not plugins:  # only ours was left: the file is not a network any more
        return Plan(None, remove_name=name)
    return Plan(name, render({**conf, "plugins": plugins}))


# ---------------------------------------------------------------------------------------------
# IO


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename, so a
    reader (the runtime) sees the old file or the new one, never a half-written one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_conf_dir(conf_dir: Path) -> dict[str, bytes]:
    """Every candidate file's bytes (unreadable files are logged and left out)."""
    try:
        names = [e.name for e in os.scandir(conf_dir) if e.is_file()]
    except OSError as e:
        raise InstallError(f"cannot read the CNI conf dir {conf_dir}: {e}") from e
    out = {}
    for name in names:
        if not name.endswith(CONFIG_SUFFIXES):
            continue
        try:
            with open(conf_dir / name, "rb") as f:
                out[name] = f.read(MAX_CONFIG_SIZE + 1)
        except OSError as e:
            log.warning("skipping unreadable CNI config %s: %s", conf_dir / name, e)
    return out


def apply_plan(conf_dir: Path, plan: Plan) -> None:
    if plan.write_name is not None:
        write_atomic(conf_dir / plan.write_name, plan.content)
    if plan.remove_name is not None and plan.remove_name != plan.write_name:
        try:
            os.unlink(conf_dir / plan.remove_name)
        except FileNotFoundError:
            pass


def install_binary(source: Path, bin_dir: Path, name: str = BINARY_NAME) -> Path:
    """Copy the plugin into the CNI bin dir (atomically, 0755). Returns the installed path."""
    try:
        data = Path(source).read_bytes()
    except OSError as e:
        raise InstallError(f"cannot read the plugin binary {source}: {e}") from e
    if not data:
        raise InstallError(f"the plugin binary {source} is empty")
    dest = Path(bin_dir) / name
    try:
        if dest.is_file() and dest.read_bytes() == data and dest.stat().st_mode & 0o777 == 0o755:
            return dest
        write_atomic(dest, data, mode=0o755)
    except OSError as e:
        raise InstallError(f"cannot write {dest}: {e}") from e
    log.info("installed the CNI plugin binary %s", dest)
    return dest


def install_config(conf_dir: Path, settings: Settings) -> Path:
    """Chain our plugin into the primary config. Returns the primary config's path."""
    conf_dir = Path(conf_dir)
    files = read_conf_dir(conf_dir)
    plan = plan_insert(files, settings)
    try:
        apply_plan(conf_dir, plan)
    except OSError as e:
        raise InstallError(f"cannot write the CNI config in {conf_dir}: {e}") from e
    if plan.changed:
        log.info("chained %s into %s", PLUGIN_TYPE, conf_dir / (plan.write_name or ""))
        return conf_dir / str(plan.write_name)
    return conf_dir / choose_primary(files)[0]


def install(source: Path, bin_dir: Path, conf_dir: Path, settings: Settings) -> Path:
    """Binary first, then the config: the runtime must never call a plugin that is not there."""
    install_binary(source, bin_dir)
    return install_config(conf_dir, settings)


def uninstall(bin_dir: Path | None, conf_dir: Path, binary_name: str = BINARY_NAME) -> list[Path]:
    """Remove our entry from every config file that holds it, then the binary (config first:
    the runtime must never call a plugin that is gone). Returns the files changed."""
    conf_dir = Path(conf_dir)
    changed = []
    for name, data in sorted(read_conf_dir(conf_dir).items()):
        plan = plan_remove(name, data)
        if plan.changed:
            apply_plan(conf_dir, plan)
            changed.append(conf_dir / name)
            log.info("removed %s from %s", PLUGIN_TYPE, conf_dir / name)
    if bin_dir is not None:
        try:
            os.unlink(Path(bin_dir) / binary_name)
            log.info("removed %s", Path(bin_dir) / binary_name)
        except FileNotFoundError:
            pass
    return changed


def _dir_signature(conf_dir: Path) -> frozenset[tuple[str, int, int, int]]:
    """What changes when any candidate file is written, replaced, added or removed."""
    out = set()
    try:
        for e in os.scandir(conf_dir):
            if e.name.endswith(CONFIG_SUFFIXES):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.add((e.name, st.st_mtime_ns, st.st_size, st.st_ino))
    except OSError:
        pass
    return frozenset(out)


async def watch_and_repair(
    conf_dir: Path,
    settings: Settings,
    *,
    interval: float = 1.0,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep our plugin chained into the primary config, forever.

    Installs once, reports the primary path (or ``None`` if there is none yet) through
    ``task_status``, then polls the directory every ``interval`` seconds and repairs on any
    change. A missing primary config is waited for, not an error: the node's main CNI daemon
    usually writes its file after we start.
    """
    conf_dir = Path(conf_dir)
    started = False
    last: frozenset[tuple[str, int, int, int]] | None = None
    last_error = ""
    while True:
        sig = _dir_signature(conf_dir)
        if sig != last:
            primary: Path | None = None
            # Keep the signature from before the repair: our own write changes it, so the next
            # poll checks once more (a no-op when nothing else wrote), and a rewrite by another
            # agent racing with ours is never missed.
            last = sig
            try:
                primary = await trio.to_thread.run_sync(install_config, conf_dir, settings)
                last_error = ""
            except Exception as e:  # InstallError, or a file vanishing under us: retry
                last = None
                if str(e) != last_error:  # say it once, not every second
                    if isinstance(e, InstallError):
                        log.warning("cannot chain %s yet: %s", PLUGIN_TYPE, e)
                    else:
                        log.exception("unexpected error while repairing the CNI config")
                    last_error = str(e)
            if not started:
                task_status.started(primary)
                started = True
        await trio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# the plugin as one file the host can run


def build_plugin_zipapp(dest: Path, interpreter: str = "/usr/bin/env python3") -> Path:
    """Pack ``cni/plugin.py`` (standard library only) into one executable zip for the CNI bin
    dir: the runtime runs it on the host, where the image's virtualenv does not exist."""
    import cni.plugin as plugin_module

    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "cni"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "plugin.py").write_bytes(Path(plugin_module.__file__).read_bytes())
        (Path(tmp) / "__main__.py").write_text(
            "import sys\nfrom cni.plugin import main\nsys.exit(main())\n"
        )
        out = dest.with_name(f".{dest.name}.build")
        zipapp.create_archive(tmp, out, interpreter=interpreter)
        data = out.read_bytes()
        out.unlink()
    write_atomic(dest, data, mode=0o755)
    return dest


# ---------------------------------------------------------------------------------------------
# CLI: nodeproxy cni-install


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="nodeproxy cni-install", description=__doc__.split("\n")[0] if __doc__ else None
    )
    p.add_argument("--bin-source", type=Path, help="the plugin file to copy (needed to install)")
    p.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR))
    p.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR))
    p.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET,
                   help="the node agent's socket as the host sees it")
    p.add_argument("--log-file", default=None, help="the plugin's log file (host path)")
    p.add_argument("--uninstall", action="store_true", help="remove the plugin and its entry")
    p.add_argument("--watch", action="store_true", help="keep re-inserting the plugin")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--uninstall-on-exit", action="store_true",
                   default=_env_flag(env, UNINSTALL_ENV),
                   help=f"with --watch: uninstall on SIGTERM (default from ${UNINSTALL_ENV})")
    p.add_argument("--build-plugin", type=Path, metavar="DEST",
                   help="write the plugin as one executable file to DEST and exit")
    p.add_argument("--log-level", default="INFO")
    return p


async def _watch_until_signal(args: argparse.Namespace, settings: Settings) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await nursery.start(
            functools.partial(watch_and_repair, args.conf_dir, settings, interval=args.interval)
        )


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings(agent_socket=args.agent_socket, log_file=args.log_file)
    try:
        if args.build_plugin is not None:
            print(build_plugin_zipapp(args.build_plugin))
            return 0
        if args.uninstall:
            uninstall(args.bin_dir, args.conf_dir)
            return 0
        if args.bin_source is None:
            log.error("--bin-source is required to install")
            return 2
        install_binary(args.bin_source, args.bin_dir)
        if not args.watch:
            print(install_config(args.conf_dir, settings))
            return 0
    except InstallError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("CNI install failed: %s", e)
        return 1
    trio.run(_watch_until_signal, args, settings)
    if args.uninstall_on_exit:
        try:
            uninstall(args.bin_dir, args.conf_dir)
        except (InstallError, OSError) as e:
            log.error("uninstall on exit failed: %s", e)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
