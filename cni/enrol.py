"""Enrolment decisions (pure): which of this node's pods should be captured right now.

The control plane decides whether a pod is meshed (namespace label
``nodeproxy.io/dataplane-mode=ambient``, pod opt-out label) and publishes it as
``Workload.protocol == "HBONE"``. The node agent knows the pods whose sandboxes it saw through
the CNI plugin (:class:`PodRecord`). This module compares the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from nodeproxy.model import MeshState, Workload


@dataclass(frozen=True)
class PodRecord:
    """A pod sandbox the CNI plugin told the agent about (persisted in the state file)."""

    container_id: str
    namespace: str
    name: str
    uid: str = ""
    netns: str = ""
    ips: tuple[str, ...] = ()
    service_account: str = ""
    # the uid sent to the node proxy in Add (the workload's uid), set while enrolled
    proxy_uid: str = ""
    enrolled: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ips"] = list(self.ips)
        return d

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PodRecord:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in raw.items() if k in known}
        d["ips"] = tuple(d.get("ips", ()))
        rec = cls(**d)
        if not rec.container_id or not rec.namespace or not rec.name:
            raise ValueError(f"pod record lacks container_id/namespace/name: {raw!r}")
        return rec

    def with_(self, **changes: Any) -> PodRecord:
        return replace(self, **changes)


class Action(Enum):
    ENROL = "enrol"  # capture it and hand it to the node proxy
    RELEASE = "release"  # remove the capture and tell the node proxy to drop it
    LEAVE = "leave"  # nothing to do


@dataclass(frozen=True)
class Decision:
    action: Action
    pod: PodRecord
    workload: Workload | None = field(default=None)


def find_workload(state: MeshState, namespace: str, name: str, uid: str = "") -> Workload | None:
    """The workload of a pod: by (namespace, name), preferring one whose uid is the pod uid."""
    candidates = [
        w for w in state.workloads.values() if w.namespace == namespace and w.name == name
    ]
    if not candidates:
        return None
    for w in candidates:
        if uid and w.uid == uid:
            return w
    return sorted(candidates, key=lambda w: w.uid)[0]


def decide_one(state: MeshState, pod: PodRecord) -> Decision:
    workload = find_workload(state, pod.namespace, pod.name, pod.uid)
    if workload is None:
        # Unknown to the control plane (not yet, or already deleted while the sandbox still
        # runs): keep whatever is in place; CNI DEL removes it when the sandbox goes.
        return Decision(Action.LEAVE, pod, None)
    if workload.meshed and not pod.enrolled:
        return Decision(Action.ENROL, pod, workload)
    if not workload.meshed and pod.enrolled:
        return Decision(Action.RELEASE, pod, workload)
    return Decision(Action.LEAVE, pod, workload)


def decide(state: MeshState, pods: Iterable[PodRecord]) -> list[Decision]:
    """One decision per known pod, in a stable order (namespace, name, container)."""
    ordered = sorted(pods, key=lambda p: (p.namespace, p.name, p.container_id))
    return [decide_one(state, p) for p in ordered]
