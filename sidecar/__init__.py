"""llm-sidecar: an observability and SLA sidecar for LLM APIs."""

__version__ = "0.1.0"
