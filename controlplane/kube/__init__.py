"""The control plane on the Kubernetes API: a small list/watch client (h11 + trio), the
Kubernetes resource source, TokenReview authentication of node proxies, and the objects the
control plane publishes (the CA root ConfigMap, gateway Deployments)."""
