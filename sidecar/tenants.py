"""Tenant attribution and the cap on distinct tenant label values (pure).

The tenant of a call comes from a request header. Values are checked before they are
used anywhere: a value that is too long or holds anything but printable ASCII becomes
``__invalid__`` (a garbage header never becomes a label). The metrics sink folds tenants
past ``max_distinct`` into ``__overflow__`` with :class:`TenantCap`, so a flood of
distinct values cannot blow up the series count; the ledger keeps the real tenant.
"""

from __future__ import annotations

UNKNOWN = "unknown"
INVALID = "__invalid__"
OVERFLOW = "__overflow__"


def clean_tenant(value: str | None, max_length: int = 128) -> str:
    """The tenant to record for a header value (``unknown`` when absent or empty)."""
    if value is None:
        return UNKNOWN
    value = value.strip()
    if not value:
        return UNKNOWN
    if len(value) > max_length or not value.isascii() or not value.isprintable():
        return INVALID
    return value


class TenantCap:
    """Remembers up to ``max_distinct`` tenants; later new ones map to ``__overflow__``."""

    def __init__(self, max_distinct: int) -> None:
        self.max_distinct = max_distinct
        self._seen: set[str] = set()
        self.folded = 0  # calls attributed to __overflow__

    def label(self, tenant: str) -> str:
        """The label value to use for ``tenant``."""
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self.max_distinct:
            self._seen.add(tenant)
            return tenant
        self.folded += 1
        return OVERFLOW
