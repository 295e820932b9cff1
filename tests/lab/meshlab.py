"""Driving a running lab from tests, through the real `nodeproxy lab` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


class Lab:
    def __init__(self, lab_dir: Path, prefix: str) -> None:
        self.dir = lab_dir
        self.prefix = prefix
        self.env = {**os.environ, "NODEPROXY_LAB_DIR": str(lab_dir), "NODEPROXY_LAB_PREFIX": prefix}

    # -- the CLI -----------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "nodeproxy.cli", "lab", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"nodeproxy lab {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def exec(self, target: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", target, "--", *cmd, check=False, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def pod(self, ref: str) -> dict[str, Any]:
        ns, name = ref.split("/")
        for p in self.status()["pods"]:
            if p["namespace"] == ns and p["name"] == name:
                return p
        raise KeyError(ref)

    def ip(self, ref: str) -> str:
        return self.pod(ref)["ip"]

    def apply(self, text: str) -> None:
        path = self.dir / f"apply-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        try:
            self.cli("apply", str(path))
        finally:
            path.unlink()

    def delete(self, kind: str, ref: str) -> None:
        self.cli("delete", kind, ref)

    def logs(self, component: str) -> str:
        return self.cli("logs", component, check=False).stdout

    # -- traffic -----------------------------------------------------------------------
    def curl(self, pod: str, url: str, *extra: str, timeout: float = 5
             ) -> subprocess.CompletedProcess[str]:
        return self.exec(pod, "curl", "-sS", "-m", str(timeout), *extra, url,
                         timeout=timeout + 30)

    def curl_json(self, pod: str, url: str, *extra: str) -> dict[str, Any] | None:
        """The echo app's JSON answer, or None if the request failed."""
        proc = self.curl(pod, url, *extra)
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    # -- node proxies ------------------------------------------------------------------
    def node_http(self, node: str, url: str) -> str:
        proc = self.exec(f"node/{node}", "curl", "-sS", "-m", "5", url)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def admin(self, node: str, path: str) -> Any:
        return json.loads(self.node_http(node, f"http://127.0.0.1:15000{path}"))

    def metrics(self, node: str) -> str:
        return self.node_http(node, "http://127.0.0.1:15020/metrics")


@contextmanager
def running_lab(lab_dir: str, prefix: str, file: str) -> Iterator[Lab]:
    """A lab up from ``file`` (relative to the project root) for the body; always taken
    down after, and checked to have left no network namespace behind."""
    assert os.geteuid() == 0, "the lab tests need root (network namespaces, iptables)"
    lab = Lab(Path(lab_dir), prefix)
    lab.cli("down", check=False)  # leftovers of an earlier crashed run
    try:
        lab.cli("up", str(ROOT / file))
        yield lab
    finally:
        down = lab.cli("down", check=False)
        assert down.returncode == 0, down.stderr
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"network namespaces left behind: {left}"


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30, every: float = 0.3) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
