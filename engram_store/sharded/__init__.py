"""Tables sharded across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``layout``: the owner function (``row % n``), ``shards.json``, :func:`write_shards` /
:func:`join_shards`. ``exchange``: the ``all_to_all_single`` routing of ids and rows.
``store``: :class:`ShardedStore` (one rank's view, global ids) and :func:`open_sharded`.
The error types live in :mod:`engram_store.errors`.
"""

from __future__ import annotations

from engram_store.errors import CollectiveOrderError, PeerFailureError, ShardLayoutError
from engram_store.sharded.exchange import (
    DEFAULT_TIMEOUT_S, Exchange, ExchangeStats, Route, peer_failure, table_tag,
)
from engram_store.sharded.layout import (
    LAYOUT_FILE, LAYOUT_FORMAT, LAYOUT_VERSION, OWNER_FUNCTION, global_index, join_shards, local_index, owner_of,
    read_layout, shard_dir_name, shard_rows, write_shards,
)
from engram_store.sharded.store import (
    DenseShard, LocalLookup, ShardedHandle, ShardedStore, ShardedTableInfo, open_sharded,
)

__all__ = [
    "DEFAULT_TIMEOUT_S", "LAYOUT_FILE", "LAYOUT_FORMAT", "LAYOUT_VERSION", "OWNER_FUNCTION", "CollectiveOrderError",
    "DenseShard", "Exchange", "ExchangeStats", "LocalLookup", "PeerFailureError", "Route", "ShardLayoutError",
    "ShardedHandle", "ShardedStore", "ShardedTableInfo", "global_index", "join_shards", "local_index",
    "open_sharded", "owner_of", "peer_failure", "read_layout", "shard_dir_name", "shard_rows", "table_tag",
    "write_shards",
]
