"""``make bench``: the sidecar against a bare aiohttp pass-through and the upstream itself.

Modules: :mod:`bench.payloads` (requests and pre-rendered responses), :mod:`bench.upstream`
(the fast mock upstream), :mod:`bench.floor` (the bare pass-through), :mod:`bench.spans`
(a span receiver that drops what it gets), :mod:`bench.loadgen` (a Python load generator
and probes; wrk is used when installed), :mod:`bench.procstat` (``/proc`` readings),
:mod:`bench.chart` (a dependency-free PNG chart) and :mod:`bench.run` (the orchestration).

Nothing under ``sidecar/`` imports this package; it talks to the sidecar over sockets only.
"""
