"""engram-store: tiered (HBM / DRAM / disk) storage for Engram memory tables.

    import engram_store
    engram_store.write("store", {"layer1": table}, order={"layer1": rank_to_row})
    with engram_store.open("store", device="cpu", hbm_bytes=..., dram_bytes=...) as store:
        h = store.prefetch("layer1", ids)   # returns at once
        rows = h.wait()                     # Tensor[*ids.shape, dim] on the store's device
"""

from engram_store import errors
from engram_store.errors import (
    BudgetError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, InvalidValuesError,
    StoreClosedError, StoreCorruptError, StoreExistsError, StoreNotFoundError, StoreWriteError, UnknownTableError,
)
from engram_store.format import FORMAT_VERSION, TableInfo
from engram_store.prefetch.handle import Handle
from engram_store.store import TableView, TieredStore, open
from engram_store.writer import StoreWriter, write

__all__ = [
    "open", "write", "StoreWriter", "TieredStore", "TableView", "Handle", "TableInfo", "FORMAT_VERSION", "errors",
    "EngramStoreError", "StoreNotFoundError", "StoreExistsError", "StoreCorruptError", "FingerprintMismatchError",
    "UnknownTableError", "InvalidRowIdsError", "InvalidValuesError", "BudgetError", "StoreClosedError",
    "StoreWriteError",
]
