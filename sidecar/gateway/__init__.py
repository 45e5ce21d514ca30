"""Gateway control: the sidecar acting on what it sees (issue 6).

Everything here is off unless configured; with none of its sections in the config the
proxy behaves exactly as a pure measuring pass-through.

Pure core (no I/O, time passed in):

- :mod:`sidecar.gateway.model` — shared value types (:class:`~sidecar.gateway.model.Limits`).
- :mod:`sidecar.gateway.keys` — virtual keys: the keys file, hashing, expiry, rotation overlap.
- :mod:`sidecar.gateway.ratelimit` — token buckets (RPM, TPM) and concurrency, and the
  providers' rate-limit response headers.
- :mod:`sidecar.gateway.breaker` — one circuit breaker per upstream.
- :mod:`sidecar.gateway.routes` — routes, fallback order, canary splits and rollback state.

Adapters:

- :mod:`sidecar.gateway.secrets` — provider keys and the keys file, re-read off the loop.
- :mod:`sidecar.gateway.sharedstate` — the same limits counted in Redis for a fleet.
"""
