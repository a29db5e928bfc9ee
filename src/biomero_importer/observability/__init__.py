"""Logs, Prometheus metrics and health endpoints: what operators see of a running service."""
