"""Authenticating node proxies (and gateways) by their projected ServiceAccount token.

The node proxy sends the token kubelet projected for it (audience ``nodeproxy``); the control
plane asks the API server about it (``TokenReview``), which answers who the token belongs
to (``system:serviceaccount:NS:SA``) and, for a pod-bound token, which pod. The node is the
pod's: the ``authentication.kubernetes.io/node-name`` extra when the API server sets it
(Kubernetes ≥ 1.30 with node binding), else the pod's ``spec.nodeName`` (checked against
the token's pod uid, so a pod recreated under the same name elsewhere does not count).

Only the node proxy's ServiceAccount gets a node; a gateway's ServiceAccount
(``nodeproxy-gateway`` in any namespace) gets the principal ``gateway:NAMESPACE`` the CA
understands. Every other token is refused. Positive answers are cached for a short while,
keyed by a hash of the token (the token itself is not kept).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable

from controlplane.kube import client as kc
from nodeproxy import model

log = logging.getLogger(__name__)

AUDIENCE = "nodeproxy"
NODE_SERVICE_ACCOUNT = ("nodeproxy-system", "nodeproxy-node")
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
GATEWAY_PRINCIPAL = "gateway:"  # as controlplane.server.GATEWAY_PRINCIPAL
SA_PREFIX = "system:serviceaccount:"


class TokenReviewAuthenticator:
    """``await principal_for(token)`` → the node name (or ``gateway:NS``), None if refused."""

    def __init__(
        self,
        client: kc.KubeClient,
        *,
        node_service_accounts: Iterable[tuple[str, str]] = (NODE_SERVICE_ACCOUNT,),
        gateway_service_account: str | None = model.GATEWAY_SERVICE_ACCOUNT,
        audience: str = AUDIENCE,
        cache_ttl: float = 60.0,
        max_cache: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.node_service_accounts = set(node_service_accounts)
        self.gateway_service_account = gateway_service_account
        self.audience = audience
        self.cache_ttl = cache_ttl
        self.max_cache = max_cache
        self.clock = clock
        self._cache: dict[bytes, tuple[float, str]] = {}  # sha256(token) → (expiry, principal)
        self.reviews = 0  # TokenReviews sent (for tests and metrics)

    async def principal_for(self, token: str) -> str | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[digest]
        try:
            principal = await self._review(token)
        except kc.KubeError as e:
            # fail closed: the node retries, and the API server is back soon
            log.error("TokenReview failed: %s", e)
            return None
        if principal is not None:
            if len(self._cache) >= self.max_cache:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self.max_cache:
                    self._cache.clear()
            self._cache[digest] = (now + self.cache_ttl, principal)
        return principal

    async def _review(self, token: str) -> str | None:
        self.reviews += 1
        answer = await self.client.create(
            kc.TOKENREVIEWS.path(),
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]},
            },
        )
        status = (answer or {}).get("status") if isinstance(answer, dict) else None
        if not isinstance(status, dict) or status.get("authenticated") is not True:
            reason = status.get("error", "not authenticated") if isinstance(status, dict) else "?"
            log.warning("token refused by the API server: %s", reason)
            return None
        audiences = status.get("audiences")
        if isinstance(audiences, list) and audiences and self.audience not in audiences:
            log.warning("token refused: audiences %s lack %r", audiences, self.audience)
            return None
        user = status.get("user") or {}
        username = user.get("username", "") if isinstance(user, dict) else ""
        if not isinstance(username, str) or not username.startswith(SA_PREFIX):
            log.warning("token refused: %r is not a ServiceAccount", username)
            return None
        namespace, _, account = username[len(SA_PREFIX) :].partition(":")
        extra = user.get("extra") or {}
        if (namespace, account) in self.node_service_accounts:
            return await self._node(namespace, account, extra if isinstance(extra, dict) else {})
        if account == self.gateway_service_account and namespace:
            return f"{GATEWAY_PRINCIPAL}{namespace}"
        log.warning("token refused: ServiceAccount %s/%s is not a node proxy's",
                    namespace, account)
        return None

    async def _node(self, namespace: str, account: str, extra: dict) -> str | None:
        node = _first(extra.get(EXTRA_NODE_NAME))
        if node:
            return node
        pod = _first(extra.get(EXTRA_POD_NAME))
        if not pod:
            # a token not bound to a pod (a long-lived Secret token) names no node
            log.warning("token of %s/%s refused: not bound to a pod", namespace, account)
            return None
        try:
            obj = await self.client.get(kc.PODS.path(namespace, pod))
        except kc.ApiError as e:
            if e.status == 404:
                log.warning("token refused: its pod %s/%s does not exist", namespace, pod)
                return None
            raise
        uid = _first(extra.get(EXTRA_POD_UID))
        meta = (obj.get("metadata") or {}) if isinstance(obj, dict) else {}
        if uid and meta.get("uid") != uid:
            log.warning("token refused: pod %s/%s is not the one the token was bound to",
                        namespace, pod)
            return None
        node = ((obj.get("spec") or {}) if isinstance(obj, dict) else {}).get("nodeName")
        if not isinstance(node, str) or not node:
            log.warning("token refused: pod %s/%s is not scheduled", namespace, pod)
            return None
        return node


def _first(value: object) -> str:
    """TokenReview extras are lists of strings."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return value if isinstance(value, str) else ""
