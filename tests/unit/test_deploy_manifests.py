"""deploy/: the Kubernetes manifests, the gateway template, the CRD and the image's pins."""

from __future__ import annotations

import copy
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate as kv  # a test extra (make test installs it)
import pytest
import yaml
from packaging.requirements import Requirement

from cni import install as cni_install
from cni import rules

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
# The oldest release the manifests promise to work on: native sidecars (restartPolicy: Always
# on an init container) are on by default from 1.29 and GA in 1.33.
K8S_VERSION = "1.33"
PLACEHOLDERS = {"NAMESPACE": "shop", "IMAGE": "registry.example/nodeproxy:0.1.0",
                "CONTROLPLANE": "nodeproxy-controlplane.nodeproxy-system.svc:15012"}


def kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def base_docs() -> list[tuple[str, dict]]:
    out = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc:
                out.append((name, doc))
    return out


def find(kind: str, name: str) -> dict:
    for _, doc in base_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/base")


def render_gateway() -> list[dict]:
    cm = find("ConfigMap", "nodeproxy-gateway-template")
    out = []
    for key, text in sorted(cm["data"].items()):
        for ph, value in PLACEHOLDERS.items():
            text = text.replace("{{" + ph + "}}", value)
        assert "{{" not in text, f"{key}: an undocumented placeholder is left"
        out.append(yaml.safe_load(text))
    return out


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> dict[str, dict]:
    spec = pod_spec(doc)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


# ---------------------------------------------------------------------------------------------
# kustomization


def test_kustomization_lists_every_file_and_only_existing_ones():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    for name in listed:
        assert (BASE / name).is_file(), f"kustomization lists {name}, which does not exist"
    present = {p.name for p in BASE.iterdir() if p.suffix in (".yaml", ".yml")}
    assert present - {"kustomization.yaml"} == set(listed), "a manifest is not in the list"


def test_every_object_has_a_kind_a_name_and_the_right_namespace():
    seen = set()
    for name, doc in base_docs():
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{name}: {key} defined twice"
        seen.add(key)
        cluster_scoped = doc["kind"] in ("Namespace", "CustomResourceDefinition",
                                         "ClusterRole", "ClusterRoleBinding")
        ns = doc["metadata"].get("namespace")
        assert (ns is None) if cluster_scoped else (ns == "nodeproxy-system"), f"{name}: {key}"


# ---------------------------------------------------------------------------------------------
# schemas




@pytest.mark.parametrize("name,doc", base_docs(),
                         ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in base_docs()])
def test_manifest_is_valid_for_kubernetes(name, doc):
    # strict: unknown fields (a typo such as mountPropogation) are errors
    kv.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", render_gateway(), ids=lambda d: d["kind"])
def test_gateway_template_renders_to_valid_objects(doc):
    kv.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"]["namespace"] == PLACEHOLDERS["NAMESPACE"]


def test_a_broken_manifest_is_caught():
    """The validation above is not vacuous."""
    ds = copy.deepcopy(find("DaemonSet", "nodeproxy-node"))
    pod_spec(ds)["containers"][0]["volumeMounts"][0]["mountPropogation"] = "HostToContainer"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(find("DaemonSet", "nodeproxy-node"))
    pod_spec(ds)["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)


def crd_schema() -> dict:
    crd = find("CustomResourceDefinition", "authorizationpolicies.security.nodeproxy.io")
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema, rejecting unknown fields the way
    `kubectl apply` with server-side strict field validation does."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items()
           if k not in ("properties", "items", "additionalProperties",
                        "x-kubernetes-int-or-string")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if "additionalProperties" in node:
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    elif "properties" in node:
        out["additionalProperties"] = False
    # an object without properties (metadata) is checked by the API server itself
    return out


def test_crd_schema_is_structural():
    """Every node has a type (or is int-or-string), as apiextensions/v1 requires."""

    def walk(node: dict, path: str) -> None:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(crd_schema(), "")


def test_example_policy_matches_the_crd_and_the_control_plane_parser():
    import jsonschema

    schema = to_json_schema(copy.deepcopy(crd_schema()))
    example = yaml.safe_load((DEPLOY / "examples" / "authorizationpolicy.yaml").read_text())
    jsonschema.validate(example, schema)
    spec = example["spec"]
    source = spec["rules"][0]["from"][0]["source"]
    operation = spec["rules"][0]["to"][0]["operation"]
    assert set(source) == {"principals", "notPrincipals", "namespaces", "notNamespaces",
                           "ipBlocks", "notIpBlocks"}
    assert set(operation) == {"ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}

    bad = [
        ("action", "MAYBE"),
        ("selector", {"matchLabels": {"app": 1}}),
        ("rules", [{"from": [{"source": {"notIPBlocks": ["10.0.0.0/8"]}}]}]),  # typo
        ("rules", [{"to": [{"operation": {"ports": [True]}}]}]),
        ("rules", [{"when": [{"values": ["x"]}]}]),  # key is required
    ]
    for field, value in bad:
        broken = copy.deepcopy(example)
        broken["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)

    # the field names are the ones the control plane reads (minus `when`, which it refuses)
    from controlplane import resources

    no_when = copy.deepcopy(example)
    del no_when["spec"]["rules"][0]["when"]
    (policy,) = resources.parse_documents(yaml.safe_dump(no_when))
    assert isinstance(policy, resources.AuthorizationPolicy)
    assert policy.action == "ALLOW" and policy.selector == {"app": "backend"}
    (rule,) = policy.rules
    assert rule.sources[0].not_ip_blocks == ("10.244.9.0/24",)
    assert rule.operations[0].ports == (8080, 8443)
    assert rule.operations[0].not_paths == ("/api/admin*",)


# ---------------------------------------------------------------------------------------------
# what the objects say


def test_rbac_is_least_privilege():
    role = find("ClusterRole", "nodeproxy-controlplane")
    grants = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                grants.setdefault((group, res), set()).update(rule["verbs"])
    flat = [v for verbs in grants.values() for v in verbs] + [g for g, _ in grants]
    assert "*" not in flat and not any(r == "*" for _, r in grants)
    read = {"get", "list", "watch"}
    for key in [("", "namespaces"), ("", "pods"), ("", "services"),
                ("discovery.k8s.io", "endpointslices"), ("gateway.networking.k8s.io", "httproutes"),
                ("security.nodeproxy.io", "authorizationpolicies")]:
        assert grants[key] == read, f"{key} must be read-only"
    assert grants[("authentication.k8s.io", "tokenreviews")] == {"create"}
    assert grants[("", "configmaps")] >= {"create", "update"}
    assert grants[("apps", "deployments")] >= {"create", "delete", "get", "list", "watch"}
    assert ("", "secrets") not in grants
    # nothing is bound to the node account, and it mounts no API token
    bindings = [d for _, d in base_docs() if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    subjects = [s for b in bindings for s in b["subjects"]]
    assert subjects == [{"kind": "ServiceAccount", "name": "controlplane",
                         "namespace": "nodeproxy-system"}]
    assert find("ServiceAccount", "node")["automountServiceAccountToken"] is False


def test_controlplane_deployment_and_service():
    dep = find("Deployment", "nodeproxy-controlplane")
    spec = pod_spec(dep)
    assert spec["serviceAccountName"] == "controlplane"
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in containers(dep).values():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    cp = containers(dep)["controlplane"]
    assert cp["readinessProbe"]
    assert {p["containerPort"] for p in cp["ports"]} == {15012, 15014}
    svc = find("Service", "nodeproxy-controlplane")
    assert {p["port"] for p in svc["spec"]["ports"]} == {15012, 15014}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_node_daemonset_shape():
    ds = find("DaemonSet", "nodeproxy-node")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["automountServiceAccountToken"] is False
    cs = containers(ds)
    assert set(cs) == {"cni-install", "ztunnel", "cni-agent"}
    assert [c["name"] for c in spec["containers"]] == ["ztunnel", "cni-agent"]
    assert cs["cni-install"]["restartPolicy"] == "Always"  # native sidecar, keeps repairing
    zt = cs["ztunnel"]
    assert zt["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert zt["lifecycle"]["preStop"]
    # every mount names a declared volume
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in cs.values():
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
    host = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert {"/var/run/netns", "/etc/cni/net.d", "/opt/cni/bin", "/var/run/nodeproxy"} <= host
    netns = [m for m in cs["cni-agent"]["volumeMounts"] if m["name"] == "netns"]
    assert netns[0]["mountPropagation"] == "HostToContainer"
    token = volumes["credentials"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "nodeproxy"
    # the installer writes the host dirs; nobody else does
    for name, c in cs.items():
        mounted = {m["name"] for m in c["volumeMounts"]}
        assert ("cni-conf" in mounted) == (name == "cni-install")


EXPECTED_CAPS = {"cni-install": set(), "ztunnel": {"NET_ADMIN", "SYS_ADMIN"},
                 "cni-agent": {"NET_ADMIN", "SYS_ADMIN"}}


def node_caps() -> dict[str, set[str]]:
    cs = containers(find("DaemonSet", "nodeproxy-node"))
    out = {}
    for name, c in cs.items():
        caps = c["securityContext"]["capabilities"]
        assert caps["drop"] == ["ALL"], name
        assert not c["securityContext"].get("privileged"), name
        out[name] = set(caps.get("add", []))
    return out


def test_node_containers_get_only_the_documented_capabilities():
    assert node_caps() == EXPECTED_CAPS


def container_args(doc: dict, name: str) -> list[str]:
    args = containers(doc)[name]["args"]
    return [a.replace("$(NODE_NAME)", "node-1") for a in args]


def test_installer_args_are_what_the_installer_accepts():
    args = container_args(find("DaemonSet", "nodeproxy-node"), "cni-install")
    assert args[0] == "cni-install"
    parsed = cni_install.build_parser(env={}).parse_args(args[1:])
    assert parsed.watch and not parsed.uninstall
    assert str(parsed.conf_dir) == "/host/etc/cni/net.d"
    assert parsed.agent_socket == "/var/run/nodeproxy/cni-plugin.sock"


@pytest.mark.parametrize("container,module", [("ztunnel", "ztunnel.proxy"),
                                              ("cni-agent", "cni.agent")])
def test_node_container_args_parse(container, module, tmp_path):
    """The DaemonSet's command lines are accepted by the real commands (argparse exits 2 with
    "usage:" on an unknown or missing option; past parsing they fail on the absent files)."""
    args = container_args(find("DaemonSet", "nodeproxy-node"), container)
    assert args[0] == container
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args[1:]], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert b"usage:" not in err, err.decode()


# ---------------------------------------------------------------------------------------------
# the capabilities suffice (and are needed) for what the node containers do


CAPSH = shutil.which("capsh")
UNSHARE = shutil.which("unshare")
ALL_CAPS = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
            "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
            "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
            "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
            "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
            "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
            "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]

# What the containers do with their privileges, in a throwaway network namespace.
PROXY_OPS = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
NEWNET = 0x40000000  # CLONE_NEWNET
home = os.open("/proc/self/ns/net", os.O_RDONLY)
if libc.unshare(NEWNET) != 0:  # stands in for the runtime making a pod netns
    raise SystemExit("unshare: " + os.strerror(ctypes.get_errno()))
pod = os.open("/proc/self/ns/net", os.O_RDONLY)
for fd in (home, pod):               # the proxy's setns dance around each listener
    if libc.setns(fd, NEWNET) != 0:
        raise SystemExit("setns: " + os.strerror(ctypes.get_errno()))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
print("ok")
"""


def run_with_caps(
    caps: set[str], argv: list[str], stdin: bytes = b""
) -> subprocess.CompletedProcess:
    keep = {c.lower() for c in caps}
    drop = ",".join(f"cap_{c}" for c in ALL_CAPS if c not in keep)
    # unshare -n: a private network namespace that vanishes with the process
    cmd = [UNSHARE, "-n", CAPSH, f"--drop={drop}", "--", "-c", 'exec "$@"', "sh", *argv]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=30)


def _root_tools() -> None:
    # make test runs as root on Debian with these installed: a missing one is a failure
    assert os.geteuid() == 0, "needs root"
    assert CAPSH and UNSHARE and shutil.which("iptables-restore"), "needs capsh, unshare, iptables"



def test_ztunnel_capabilities_suffice_and_are_needed():
    _root_tools()
    caps = node_caps()["ztunnel"]
    ok = run_with_caps(caps, [sys.executable, "-c", PROXY_OPS])
    assert ok.returncode == 0 and ok.stdout.strip() == b"ok", ok.stderr.decode()
    for cap in caps:
        without = run_with_caps(caps - {cap}, [sys.executable, "-c", PROXY_OPS])
        assert without.returncode != 0, f"{cap} is granted but not needed"


def test_cni_agent_capabilities_program_the_capture_rules():
    _root_tools()
    caps = node_caps()["cni-agent"]
    script = (
        "set -e\n"
        "iptables-restore --noflush --wait\n"
        f"ip rule add fwmark {rules.CONN_MARK:#x}/{rules.MARK_MASK:#x} "
        f"pref {rules.RULE_PREF} lookup {rules.ROUTE_TABLE}\n"
        f"ip route add local 0.0.0.0/0 dev lo table {rules.ROUTE_TABLE}\n"
        "iptables-save -t nat\n"
    )
    ok = run_with_caps(caps, ["/bin/sh", "-c", script], stdin=rules.pod_rules().encode())
    assert ok.returncode == 0, ok.stderr.decode()
    assert b"ISTIO_OUTPUT" in ok.stdout
    without = run_with_caps(caps - {"NET_ADMIN"}, ["/bin/sh", "-c", script],
                            stdin=rules.pod_rules().encode())
    assert without.returncode != 0


# ---------------------------------------------------------------------------------------------
# the image


def test_containerfile_pins_everything():
    text = (DEPLOY / "Containerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(re.fullmatch(r"\S+:12\.\d+-slim", f) for f in froms), froms
    installs = re.findall(r"apt-get install[^\n]*\\\n((?:\s+\S+\s*\\?\n)+)", text)
    packages = [p for block in installs for p in block.replace("\\", " ").split()]
    assert packages and all(re.fullmatch(r"[a-z0-9.+-]+=\S+", p) for p in packages), packages
    names = {p.split("=")[0] for p in packages}
    assert {"iptables", "iproute2", "python3"} <= names
    assert re.search(r"^USER\s+10001:10001$", text, re.M)
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
    assert "--build-plugin /opt/nodeproxy/cni-plugin/nodeproxy-cni" in text
    ds_args = containers(find("DaemonSet", "nodeproxy-node"))["cni-install"]["args"]
    assert "--bin-source=/opt/nodeproxy/cni-plugin/nodeproxy-cni" in ds_args


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line}: not pinned with =="
            pins[_norm(name)] = version
    return pins


def test_image_requirements_match_pyproject_and_cover_the_closure():
    lock = _pins(DEPLOY / "requirements.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        assert lock.get(_norm(name)) == version, f"{dep} differs in deploy/requirements.txt"
    # every installed dependency of those, transitively, is in the lock at the same version
    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    todo, seen = [dep.partition("==")[0] for dep in project["dependencies"]], set()
    while todo:
        key = _norm(todo.pop())
        if key in seen or key not in installed:
            continue
        seen.add(key)
        assert lock.get(key) == installed[key].version, f"{key} missing or different in lock"
        for text in installed[key].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)


def test_the_whole_dev_venv_is_pinned():
    """`make` installs with both lock files as constraints: nothing in the venv floats."""
    image, dev = _pins(DEPLOY / "requirements.txt"), _pins(ROOT / "tests" / "requirements.txt")
    assert not set(image) & set(dev), "a package is pinned in both lock files"
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]:
        name, _, version = dep.partition("==")
        assert dev.get(_norm(name)) == version, f"{dep} differs in tests/requirements.txt"
    pins = image | dev
    tools = {"pip", "setuptools", "wheel", "nodeproxy"}  # the venv's own and the project
    for dist in md.distributions():
        key = _norm(dist.metadata["Name"])
        if key not in tools:
            assert pins.get(key) == dist.version, f"{key} {dist.version} not pinned as installed"


def test_documented_ca_secret_is_one_the_control_plane_loads(tmp_path):
    """deploy/README.md's openssl command makes a root the CA code accepts."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl not installed"
    readme = (DEPLOY / "README.md").read_text()
    match = re.search(r"^(openssl req .*?-out root-cert\.pem)$", readme, re.M | re.S)
    assert match
    cmd = match.group(1).replace("\\\n", " ")
    subprocess.run(cmd, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=30)
    from controlplane.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    chain, _ = ca.issue("spiffe://cluster.local/ns/shop/sa/frontend", timedelta(hours=1))
    assert len(chain) == 2
