"""Tables sharded across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``layout``: ``shards.json`` and the owner functions (``row_mod_n``: ``row % n``; ``head_ranges``:
whole hash heads, contiguous rows; one file each, base in ``owner``). ``write`` / ``join``:
:func:`write_shards` / :func:`join_shards`, streaming with bounded memory from any row source
(``sources``). ``exchange``: the ``all_to_all_single`` routing of ids and rows. ``store``:
:class:`ShardedStore` (one rank's view, global ids) and :func:`open_sharded`.
The error types live in :mod:`engram_store.errors`.
"""

from __future__ import annotations

from engram_store.errors import CollectiveOrderError, PeerFailureError, ShardLayoutError
from engram_store.sharded.exchange import (
    DEFAULT_TIMEOUT_S, Exchange, ExchangeStats, Route, peer_failure, table_tag,
)
from engram_store.sharded.head_ranges import HeadRanges, split_heads
from engram_store.sharded.join import join_shards
from engram_store.sharded.layout import (
    LAYOUT_FILE, LAYOUT_FORMAT, LAYOUT_VERSION, OWNER_FUNCTION, global_index, local_index, make_owner, owner_of,
    owners_of, read_layout, shard_dir_name, shard_rows,
)
from engram_store.sharded.owner import OWNER_FUNCTIONS, Owner
from engram_store.sharded.row_mod_n import RowModN
from engram_store.sharded.sources import DenseSource, RangeSource, RowSource, StoreSource, TableSpec
from engram_store.sharded.store import (
    DenseShard, LocalLookup, ShardedHandle, ShardedStore, ShardedTableInfo, open_sharded,
)
from engram_store.sharded.write import write_shards

__all__ = [
    "DEFAULT_TIMEOUT_S", "LAYOUT_FILE", "LAYOUT_FORMAT", "LAYOUT_VERSION", "OWNER_FUNCTION", "OWNER_FUNCTIONS",
    "CollectiveOrderError", "DenseShard", "DenseSource", "Exchange", "ExchangeStats", "HeadRanges", "LocalLookup",
    "Owner", "PeerFailureError", "RangeSource", "Route", "RowModN", "RowSource", "ShardLayoutError", "ShardedHandle",
    "ShardedStore", "ShardedTableInfo", "StoreSource", "TableSpec", "global_index", "join_shards", "local_index",
    "make_owner", "open_sharded", "owner_of", "owners_of", "peer_failure", "read_layout", "shard_dir_name",
    "shard_rows", "split_heads", "table_tag", "write_shards",
]
