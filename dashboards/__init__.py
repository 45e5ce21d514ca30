"""Grafana dashboards for llm-sidecar: the generator, the demo stack that feeds them, the renderer."""
