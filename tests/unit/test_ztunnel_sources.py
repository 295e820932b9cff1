"""The node proxy's source address → pod map follows pods leaving (no stale owners)."""

from __future__ import annotations

import pytest

from tests.unit.test_ztunnel_workers import StandInCerts, StandInDiscovery
from ztunnel.hbone.pool import PoolKey
from ztunnel.proxy import NodeProxy


class _Pod:
    """What NodeProxy.delete asks of a pod proxy."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.identity = f"spiffe://cluster.local/ns/shop/sa/{uid}"
        self.namespace, self.name = "shop", uid
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


async def test_a_released_pod_no_longer_owns_its_source_addresses():
    proxy = NodeProxy("node-a", StandInDiscovery(), StandInCerts())  # type: ignore[arg-type]
    old, other = _Pod("old"), _Pod("other")
    proxy.pods.update({"old": old, "other": other})  # type: ignore[dict-item]
    proxy.remember_source("10.244.1.5", old)  # type: ignore[arg-type]
    proxy.remember_source("10.244.1.6", other)  # type: ignore[arg-type]
    await proxy.delete("old")
    assert old.stopped
    key = PoolKey(src_identity=old.identity, dst_identities=frozenset({"spiffe://x"}),
                  next_hop=("10.244.2.2", 15008), src_ip="10.244.1.5")
    with pytest.raises(OSError, match="no enrolled pod owns source address 10.244.1.5"):
        await proxy._connect_hbone(key)
    assert proxy._sources == {"10.244.1.6": other}
