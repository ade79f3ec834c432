"""Network faults between a client and PostgreSQL: the names of both tools in one place.

- ``labkit.lab.proxy``: ``FaultProxy``, a TCP proxy that adds latency, cuts flows,
  loses answers and black-holes flows (no root, no kernel support needed).
- ``labkit.lab.netns``: ``NetworkNamespace``, a private network namespace where
  nftables rules drop packets in the kernel (a real partition; root, or an ordinary
  user where the kernel allows user namespaces).
"""

from labkit.lab.netns import NetworkNamespace, NftTable, namespace_unavailable
from labkit.lab.proxy import (
    COMMITS,
    CONNECTIONS,
    CUTS,
    OPEN_CONNECTIONS,
    REAPED,
    REPLIES_DROPPED,
    REQUESTS,
    Cut,
    FaultProxy,
    Reap,
)

__all__ = [
    "COMMITS",
    "CONNECTIONS",
    "CUTS",
    "OPEN_CONNECTIONS",
    "REAPED",
    "REPLIES_DROPPED",
    "REQUESTS",
    "Cut",
    "FaultProxy",
    "NetworkNamespace",
    "NftTable",
    "Reap",
    "namespace_unavailable",
]
