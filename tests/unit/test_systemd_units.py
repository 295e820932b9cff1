"""systemd/: the VM units pass `systemd-analyze verify`, are hardened, and start real commands."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNITS = ["nodeproxy-controlplane.service", "nodeproxy-ztunnel.service",
         "nodeproxy-cni-agent.service", "nodeproxy-ztunnel-vm.service"]
INSTALLED = "/opt/nodeproxy/.venv/bin/nodeproxy"
VENV_NODEPROXY = Path(sys.executable).parent / "nodeproxy"
ANALYZE = shutil.which("systemd-analyze")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (in order), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def unit(name: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD / name).read_text())["Service"]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_units_pass_systemd_analyze_verify(tmp_path):
    """verify checks every directive and that ExecStart= exists: the copies point it at this
    checkout's own nodeproxy script (same unit otherwise)."""
    assert VENV_NODEPROXY.is_file(), "the venv's nodeproxy console script is missing"
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED in text
        (tmp_path / name).write_text(text.replace(INSTALLED, str(VENV_NODEPROXY)))
    proc = subprocess.run([ANALYZE, "verify", "--man=no", *[str(tmp_path / n) for n in UNITS]],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    ours = [line for line in proc.stderr.splitlines()
            if any(n in line for n in UNITS) or str(tmp_path) in line]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above is not vacuous: a typo or a missing binary is reported."""
    name = "nodeproxy-ztunnel.service"
    text = (SYSTEMD / name).read_text().replace("LockPersonality=", "LockPersonalty=")
    (tmp_path / name).write_text(text.replace(INSTALLED, str(VENV_NODEPROXY)))
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "LockPersonalty" in proc.stderr
    (tmp_path / name).write_text((SYSTEMD / name).read_text())  # /opt/nodeproxy is absent here
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and "not executable" in proc.stderr


@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened(name):
    s = unit(name)
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("Restart", "on-failure")]:
        assert s.get(key) == [value], f"{name}: {key}"
    assert s["RestartSec"] and s["LimitNOFILE"]
    short = name.removeprefix("nodeproxy-").removesuffix(".service")
    assert s["EnvironmentFile"] == [f"/etc/nodeproxy/{short}.env"]
    assert (SYSTEMD / f"{short}.env").is_file(), "no example env file"
    command = short.removesuffix("-vm")  # the VM unit runs `nodeproxy ztunnel --host-mode`
    assert s["ExecStart"][0].startswith(INSTALLED + " " + command + " ")
    unit_section = parse_unit((SYSTEMD / name).read_text())["Unit"]
    assert "network-online.target" in " ".join(unit_section["After"])
    assert "network-online.target" in " ".join(unit_section["Wants"])
    assert s.get("CapabilityBoundingSet") is not None


def test_capabilities_are_the_needed_ones_only():
    cp = unit("nodeproxy-controlplane.service")
    assert cp["CapabilityBoundingSet"] == [""] and cp["AmbientCapabilities"] == [""]
    assert cp["DynamicUser"] == ["yes"]
    for name in ("nodeproxy-ztunnel.service", "nodeproxy-cni-agent.service"):
        s = unit(name)
        assert set(s["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
        assert s["RestrictNamespaces"] == ["net"]
        assert s["RuntimeDirectory"] == ["nodeproxy"]
        assert s["RuntimeDirectoryPreserve"] == ["yes"]  # shared: one stopping keeps the other's
        assert "/run/nodeproxy" in s["ReadWritePaths"][0]
    # the node proxy connects where the agent listens
    assert "--agent-socket /run/nodeproxy/ztunnel.sock" in unit(
        "nodeproxy-ztunnel.service")["ExecStart"][0]
    assert "--ztunnel-socket /run/nodeproxy/ztunnel.sock" in unit(
        "nodeproxy-cni-agent.service")["ExecStart"][0]
    # a VM: host mode, the same capabilities, no agent
    vm = unit("nodeproxy-ztunnel-vm.service")
    assert set(vm["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert "--host-mode" in vm["ExecStart"][0] and "--agent-socket" not in vm["ExecStart"][0]


def exec_argv(name: str) -> list[str]:
    """ExecStart= as systemd would run it with the example env file (specifiers expanded)."""
    s = unit(name)
    short = name.removeprefix("nodeproxy-").removesuffix(".service")
    env = env_file(SYSTEMD / f"{short}.env")
    line = s["ExecStart"][0].replace("%S", "/var/lib").replace("%d", f"/run/credentials/{name}")
    missing = set(re.findall(r"\$\{(\w+)\}", line)) - set(env)
    assert not missing, f"{name}: {missing} not set in the example env file"
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
    return shlex.split(line)[1:]


def test_controlplane_command_line_is_accepted():
    from controlplane.main import parser

    argv = exec_argv("nodeproxy-controlplane.service")
    assert argv[0] == "controlplane"
    args = parser().parse_args(argv[1:])
    assert str(args.state_dir) == "/var/lib/nodeproxy/controlplane"
    assert str(args.tokens) == "/run/credentials/nodeproxy-controlplane.service/tokens"


@pytest.mark.parametrize("name,module", [("nodeproxy-ztunnel.service", "ztunnel.proxy"),
                                         ("nodeproxy-ztunnel-vm.service", "ztunnel.proxy"),
                                         ("nodeproxy-cni-agent.service", "cni.agent")])
def test_node_command_lines_are_accepted(name, module):
    """argparse exits 2 with "usage:" on an unknown or missing option; past parsing the
    commands fail on the absent credential files, which is fine here."""
    argv = exec_argv(name)
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv[1:]], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert b"usage:" not in err, err.decode()
