"""The CNI installer on temporary directories holding the configs real CNIs write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cni import install as ci

# What the common CNIs write into /etc/cni/net.d (as they ship them, formatting included).
CALICO = """{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "worker-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
"""

FLANNEL = """{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"""

CILIUM = """{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {
       "type": "cilium-cni",
       "enable-debug": false,
       "log-file": "/var/run/cilium/cilium-cni.log"
    }
  ]
}
"""

KINDNET = """
{
\t"cniVersion": "0.3.1",
\t"name": "kindnet",
\t"plugins": [
\t{
\t\t"type": "ptp",
\t\t"ipMasq": false,
\t\t"ipam": {
\t\t\t"type": "host-local",
\t\t\t"dataDir": "/run/cni-ipam-state",
\t\t\t"routes": [
\t\t\t\t{ "dst": "0.0.0.0/0" }
\t\t\t],
\t\t\t"ranges": [
\t\t\t\t[ { "subnet": "10.244.1.0/24" } ]
\t\t\t]
\t\t}
\t\t,
\t\t"mtu": 1500
\t},
\t{
\t\t"type": "portmap",
\t\t"capabilities": {
\t\t\t"portMappings": true
\t\t}
\t}
\t]
}
"""

BRIDGE_CONF = """{
  "cniVersion": "0.4.0",
  "name": "bridge",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipMasq": true,
  "hairpinMode": true,
  "ipam": {
    "type": "host-local",
    "routes": [{ "dst": "0.0.0.0/0" }],
    "ranges": [[{ "subnet": "10.88.0.0/16", "gateway": "10.88.0.1" }]]
  }
}
"""

LOOPBACK_CONF = '{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}\n'
CALICO_KUBECONFIG = "# Kubeconfig file for Calico CNI plugin.\napiVersion: v1\nkind: Config\n"

SETTINGS = ci.Settings(agent_socket="/var/run/nodeproxy/cni-plugin.sock",
                       log_file="/var/run/nodeproxy/cni-plugin.log")
OUR_ENTRY = {"type": "nodeproxy-cni", "agentSocket": "/var/run/nodeproxy/cni-plugin.sock",
             "logFile": "/var/run/nodeproxy/cni-plugin.log"}

CONFLISTS = {
    "10-calico.conflist": CALICO,
    "10-flannel.conflist": FLANNEL,
    "05-cilium.conflist": CILIUM,
    "10-kindnet.conflist": KINDNET,
}


def load(path: Path) -> dict:
    return json.loads(path.read_bytes())


def ours(conf: dict) -> list[dict]:
    return [p for p in conf["plugins"] if p.get("type") == "nodeproxy-cni"]


def leftovers(d: Path) -> list[str]:
    """Temporary files an interrupted or sloppy write would leave behind."""
    return [n for n in os.listdir(d) if n.endswith(".tmp") or n.endswith(".build")]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    src = tmp_path / "nodeproxy-cni.src"
    src.write_bytes(b"#!/bin/sh\necho plugin\n")
    return conf, bin_dir, src


@pytest.mark.parametrize("name", sorted(CONFLISTS))
def test_appends_to_each_common_cni_and_keeps_the_rest(dirs, name):
    conf, bin_dir, src = dirs
    (conf / name).write_text(CONFLISTS[name])
    (conf / "calico-kubeconfig").write_text(CALICO_KUBECONFIG)
    (conf / "99-loopback.conf").write_text(LOOPBACK_CONF)
    original = json.loads(CONFLISTS[name])

    primary = ci.install(src, bin_dir, conf, SETTINGS)

    assert primary == conf / name
    new = load(primary)
    assert new["plugins"][-1] == OUR_ENTRY
    assert new["plugins"][:-1] == original["plugins"]
    assert {k: v for k, v in new.items() if k != "plugins"} == {
        k: v for k, v in original.items() if k != "plugins"
    }
    assert list(new) == list(original)  # key order kept too
    assert oct(primary.stat().st_mode & 0o777) == oct(0o644)
    # the other files are not touched
    assert (conf / "calico-kubeconfig").read_text() == CALICO_KUBECONFIG
    assert (conf / "99-loopback.conf").read_text() == LOOPBACK_CONF
    assert leftovers(conf) == [] and leftovers(bin_dir) == []
    installed = bin_dir / "nodeproxy-cni"
    assert installed.read_bytes() == src.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o755


def test_primary_is_first_valid_by_name(dirs):
    conf, _, _ = dirs
    for name, text in CONFLISTS.items():
        if name != "10-kindnet.conflist":
            (conf / name).write_text(text)
    ci.install_config(conf, SETTINGS)
    assert ours(load(conf / "05-cilium.conflist")) == [OUR_ENTRY]
    # the runtime only reads the primary: the others stay as their CNI wrote them
    assert (conf / "10-calico.conflist").read_text() == CALICO
    assert (conf / "10-flannel.conflist").read_text() == FLANNEL


def test_broken_and_incomplete_files_are_skipped_and_left_alone(dirs):
    conf, _, _ = dirs
    broken = {
        "00-broken.conflist": '{"name": "x", "plugins": [',
        "01-notype.conf": '{"cniVersion": "0.3.1", "name": "notype"}',
        "02-noplugins.conflist": '{"cniVersion": "0.3.1", "name": "empty", "plugins": []}',
        "03-noname.conflist": '{"cniVersion": "0.3.1", "plugins": [{"type": "bridge"}]}',
        "04-array.json": "[1, 2, 3]",
        "06-plugin-without-type.conflist": '{"name": "n", "plugins": [{"bridge": "cni0"}]}',
    }
    for name, text in broken.items():
        (conf / name).write_text(text)
    (conf / "10-flannel.conflist").write_text(FLANNEL)
    (conf / "00-readme.txt").write_text("not a config")

    assert ci.install_config(conf, SETTINGS) == conf / "10-flannel.conflist"
    assert ours(load(conf / "10-flannel.conflist")) == [OUR_ENTRY]
    for name, text in broken.items():
        assert (conf / name).read_text() == text


def test_empty_dir_is_a_clear_error(dirs, caplog):
    conf, bin_dir, src = dirs
    with pytest.raises(ci.NoPrimaryConfig, match="no valid CNI configuration"):
        ci.install_config(conf, SETTINGS)
    (conf / "00-broken.conflist").write_text("{")
    with pytest.raises(ci.NoPrimaryConfig, match=r"00-broken\.conflist: invalid JSON"):
        ci.install_config(conf, SETTINGS)
    # the CLI says so and fails, without a traceback
    argv = ["--bin-source", str(src), "--bin-dir", str(bin_dir), "--conf-dir", str(conf)]
    assert ci.main(argv) == 1
    assert "no valid CNI configuration" in caplog.text
    assert "Traceback" not in caplog.text
    missing = ["--bin-source", str(src), "--bin-dir", str(bin_dir), "--conf-dir",
               str(conf / "nope")]
    assert ci.main(missing) == 1


def test_single_plugin_conf_becomes_a_conflist(dirs):
    conf, _, _ = dirs
    (conf / "10-bridge.conf").write_text(BRIDGE_CONF)
    (conf / "99-loopback.conf").write_text(LOOPBACK_CONF)
    original = json.loads(BRIDGE_CONF)

    primary = ci.install_config(conf, SETTINGS)

    assert primary == conf / "10-bridge.conflist"
    assert not (conf / "10-bridge.conf").exists()
    new = load(primary)
    assert new["cniVersion"] == "0.4.0" and new["name"] == "bridge"
    bridge = {k: v for k, v in original.items() if k not in ("cniVersion", "name")}
    assert new["plugins"] == [bridge, OUR_ENTRY]
    # the runtime would now pick the new file as the primary
    assert ci.choose_primary(ci.read_conf_dir(conf))[0] == "10-bridge.conflist"
    # and a second run changes nothing
    before = primary.read_bytes()
    ci.install_config(conf, SETTINGS)
    assert primary.read_bytes() == before and not (conf / "10-bridge.conf").exists()


def test_json_suffix_single_config_is_converted_too(dirs):
    conf, _, _ = dirs
    (conf / "50-bridge.json").write_text(BRIDGE_CONF)
    assert ci.install_config(conf, SETTINGS) == conf / "50-bridge.conflist"
    assert not (conf / "50-bridge.json").exists()


def test_idempotent_and_settings_replace_our_entry(dirs):
    conf, bin_dir, src = dirs
    path = conf / "10-calico.conflist"
    path.write_text(CALICO)
    ci.install(src, bin_dir, conf, SETTINGS)
    first, inode = path.read_bytes(), path.stat().st_ino
    ci.install(src, bin_dir, conf, SETTINGS)
    assert path.read_bytes() == first
    assert path.stat().st_ino == inode  # nothing rewritten when nothing changed

    other = ci.Settings(agent_socket="/run/other.sock")
    ci.install_config(conf, other)
    new = load(path)
    assert ours(new) == [{"type": "nodeproxy-cni", "agentSocket": "/run/other.sock"}]
    assert new["plugins"][:-1] == json.loads(CALICO)["plugins"]


def test_our_entry_is_moved_back_to_the_end(dirs):
    conf, _, _ = dirs
    path = conf / "10-flannel.conflist"
    original = json.loads(FLANNEL)
    tampered = dict(original)
    tampered["plugins"] = [original["plugins"][0], OUR_ENTRY, OUR_ENTRY, original["plugins"][1]]
    path.write_text(json.dumps(tampered))
    ci.install_config(conf, SETTINGS)
    assert load(path)["plugins"] == original["plugins"] + [OUR_ENTRY]


def test_uninstall_restores_the_plugins_list_and_removes_the_binary(dirs):
    conf, bin_dir, src = dirs
    for name, text in CONFLISTS.items():
        (conf / name).write_text(text)
    (conf / "10-bridge.conf").write_text(BRIDGE_CONF)
    ci.install(src, bin_dir, conf, SETTINGS)
    # a primary that changed since: our entry sits in two files now
    (conf / "01-new.conflist").write_text(FLANNEL.replace("cbr0", "new"))
    ci.install_config(conf, SETTINGS)

    changed = ci.uninstall(bin_dir, conf)

    assert sorted(p.name for p in changed) == ["01-new.conflist", "05-cilium.conflist"]
    for name, text in CONFLISTS.items():
        assert load(conf / name) == json.loads(text)
    assert load(conf / "01-new.conflist") == json.loads(FLANNEL.replace("cbr0", "new"))
    assert not (bin_dir / "nodeproxy-cni").exists()
    assert ci.uninstall(bin_dir, conf) == []  # idempotent


def test_uninstall_of_a_converted_conf_keeps_a_working_conflist(dirs):
    conf, bin_dir, src = dirs
    (conf / "10-bridge.conf").write_text(BRIDGE_CONF)
    ci.install(src, bin_dir, conf, SETTINGS)
    ci.uninstall(bin_dir, conf)
    new = load(conf / "10-bridge.conflist")
    bridge = {k: v for k, v in json.loads(BRIDGE_CONF).items() if k not in ("cniVersion", "name")}
    assert new["plugins"] == [bridge]
    assert ci.choose_primary(ci.read_conf_dir(conf))[0] == "10-bridge.conflist"


def test_binary_is_replaced_by_rename_not_rewritten_in_place(dirs):
    conf, bin_dir, src = dirs
    dest = bin_dir / "nodeproxy-cni"
    dest.write_bytes(b"old version")
    old_inode = dest.stat().st_ino
    # a runtime executing the old binary keeps its file: rewriting it in place would fail
    # (ETXTBSY) or corrupt the running copy
    with open(dest, "rb") as running:
        ci.install_binary(src, bin_dir)
        assert running.read() == b"old version"
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_ino != old_inode
    assert dest.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ci.InstallError, match="cannot read the plugin binary"):
        ci.install_binary(bin_dir / "missing", bin_dir)


def test_the_packed_plugin_runs_with_the_hosts_python(tmp_path):
    """What lands in /opt/cni/bin must run on the host, where the image's venv is absent."""
    (tmp_path / "bin").mkdir()
    plugin = ci.build_plugin_zipapp(tmp_path / "bin" / "nodeproxy-cni")
    assert plugin.stat().st_mode & 0o777 == 0o755
    out = subprocess.run(
        [str(plugin)],
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        input=b'{"cniVersion": "1.0.0"}',
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert "1.0.0" in json.loads(out.stdout)["supportedVersions"]
    # fails closed when the agent is away (code 11: try again later)
    add = subprocess.run(
        [str(plugin)],
        env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x",
             "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "PATH": "/usr/bin:/bin",
             "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_UID=u"},
        input=json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "nodeproxy-cni",
                          "agentSocket": str(tmp_path / "absent.sock"),
                          "prevResult": {"cniVersion": "1.0.0",
                                         "interfaces": [{"name": "eth0", "sandbox": "x"}],
                                         "ips": [{"address": "10.88.0.5/16", "interface": 0}]},
                          }).encode(),
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    assert add.returncode != 0
    assert json.loads(add.stdout)["code"] == 11


async def wait_for(predicate, what: str) -> None:
    with trio.move_on_after(10) as scope:
        while not predicate():
            await trio.sleep(0.01)
    if scope.cancelled_caught:
        pytest.fail(f"timed out waiting for {what}")


def has_our_entry(path: Path) -> bool:
    try:
        conf = load(path)
    except (OSError, ValueError):
        return False
    return ours(conf) == [OUR_ENTRY] and conf["plugins"][-1] == OUR_ENTRY


async def test_watch_reinserts_after_a_rewrite_and_follows_a_new_primary(dirs):
    conf, _, _ = dirs
    calico = conf / "10-calico.conflist"
    calico.write_text(CALICO)
    async with trio.open_nursery() as nursery:
        primary = await nursery.start(
            lambda task_status: ci.watch_and_repair(conf, SETTINGS, interval=0.01,
                                                    task_status=task_status)
        )
        assert primary == calico and has_our_entry(calico)

        # calico-node rewrites its file (atomically, as it does) without our entry
        ci.write_atomic(calico, CALICO.encode())
        assert not has_our_entry(calico)
        await wait_for(lambda: has_our_entry(calico), "re-insertion after a rewrite")

        # and in place, keeping the same size and inode
        with open(calico, "r+b") as f:
            f.truncate(0)
            f.write(CALICO.encode())
        await wait_for(lambda: has_our_entry(calico), "re-insertion after an in-place write")

        # a new CNI takes over: its file sorts first and becomes the primary
        cilium = conf / "05-cilium.conflist"
        cilium.write_text(CILIUM)
        await wait_for(lambda: has_our_entry(cilium), "insertion into the new primary")
        assert load(cilium)["plugins"][:-1] == json.loads(CILIUM)["plugins"]
        nursery.cancel_scope.cancel()
    assert leftovers(conf) == []


async def test_watch_waits_for_the_primary_cni(dirs):
    conf, _, _ = dirs
    async with trio.open_nursery() as nursery:
        primary = await nursery.start(
            lambda task_status: ci.watch_and_repair(conf, SETTINGS, interval=0.01,
                                                    task_status=task_status)
        )
        assert primary is None  # nothing to chain into yet, and no crash
        (conf / "00-broken.conflist").write_text("{")
        (conf / "10-bridge.conf").write_text(BRIDGE_CONF)
        await wait_for(lambda: has_our_entry(conf / "10-bridge.conflist"), "the bridge conflist")
        assert not (conf / "10-bridge.conf").exists()
        assert (conf / "00-broken.conflist").read_text() == "{"
        nursery.cancel_scope.cancel()


def test_cli_install_and_uninstall(dirs, capsys):
    conf, bin_dir, src = dirs
    (conf / "10-kindnet.conflist").write_text(KINDNET)
    argv = ["--bin-source", str(src), "--bin-dir", str(bin_dir), "--conf-dir", str(conf),
            "--agent-socket", "/var/run/nodeproxy/cni-plugin.sock",
            "--log-file", "/var/run/nodeproxy/cni-plugin.log"]
    assert ci.main(argv) == 0
    assert str(conf / "10-kindnet.conflist") in capsys.readouterr().out
    assert has_our_entry(conf / "10-kindnet.conflist")
    assert (bin_dir / "nodeproxy-cni").read_bytes() == src.read_bytes()
    assert ci.main(["--uninstall", "--bin-dir", str(bin_dir), "--conf-dir", str(conf)]) == 0
    assert load(conf / "10-kindnet.conflist") == json.loads(KINDNET)
    assert not (bin_dir / "nodeproxy-cni").exists()
    assert ci.main(["--bin-dir", str(bin_dir), "--conf-dir", str(conf)]) == 2  # no source


def test_cli_watch_process_repairs_and_uninstalls_on_sigterm_when_asked(dirs):
    conf, bin_dir, src = dirs
    path = conf / "10-flannel.conflist"
    path.write_text(FLANNEL)
    cmd = [sys.executable, "-m", "cni.install", "--bin-source", str(src), "--bin-dir",
           str(bin_dir), "--conf-dir", str(conf), "--watch", "--interval", "0.05",
           "--agent-socket", SETTINGS.agent_socket, "--log-file", str(SETTINGS.log_file)]
    env = dict(os.environ, **{ci.UNINSTALL_ENV: "1"})
    proc = subprocess.Popen(cmd, env=env, cwd=Path(ci.__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        trio.run(wait_for, lambda: has_our_entry(path), "the watcher's first install")
        path.write_text(FLANNEL)  # flanneld rewrites its config
        trio.run(wait_for, lambda: has_our_entry(path), "the watcher's repair")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load(path) == json.loads(FLANNEL)
    assert not (bin_dir / "nodeproxy-cni").exists()
