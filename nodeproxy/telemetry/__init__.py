"""Telemetry: Istio-named Prometheus metrics, the small HTTP server for metrics, readiness and
admin, and the access log."""
