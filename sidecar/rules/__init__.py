"""Alert rules: the declarative rule files, the in-process engine, and the Prometheus export.

Modules, in import order (each may import only those above it):

- :mod:`~sidecar.rules.model`: frozen dataclasses a rule file becomes (pure).
- :mod:`~sidecar.rules.templates`: annotation templates, rendered as Prometheus does (pure).
- :mod:`~sidecar.rules.burnrate`: the multiwindow burn-rate table (package data).
- :mod:`~sidecar.rules.spec`: text → rules and every located problem (pure).
- :mod:`~sidecar.rules.windows`: bucketed sliding windows and ``histogram_quantile`` (pure).
- :mod:`~sidecar.rules.state`: the Prometheus alert state machine (pure).
- :mod:`~sidecar.rules.incidents`: firing episodes as incidents, MTTR/MTTA (pure).
- :mod:`~sidecar.rules.engine`: ``observe(record, now)``, ``evaluate(now)`` (pure).
- :mod:`~sidecar.rules.export`: Prometheus / prometheus-operator / Alertmanager text (pure).
- :mod:`~sidecar.rules.loader`: reads rule files from disk.
- :mod:`~sidecar.rules.commands`: the ``rules`` and ``incidents`` subcommands.
- :mod:`~sidecar.rules.testing`: fake-clock helpers for tests and examples.

The runtime that ties the engine to records, notifications (:mod:`sidecar.notify`)
and the incident store (:mod:`sidecar.incidents`) is :mod:`sidecar.alerting`.
The pure modules never import asyncio, aiohttp, prometheus_client or apprise, never
open a file or socket, and take the current time as an argument.
"""
