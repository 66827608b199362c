"""The project's exception types.

One base class that subclasses ``ValueError`` (so callers that catch ValueError keep
working) and narrower types that also subclass the builtin a caller would expect:
a missing store is a ``FileNotFoundError``, an unknown table a ``KeyError``, an id
out of range an ``IndexError``. Messages say what was wrong *and* what to do.
"""

from __future__ import annotations


class EngramStoreError(ValueError):
    """Base class of every error raised by engram_store, engram_model and the CLI."""


class StoreNotFoundError(EngramStoreError, FileNotFoundError):
    """A store directory, or a file it must contain, does not exist."""


class StoreExistsError(EngramStoreError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class StoreWriteError(EngramStoreError, OSError):
    """Writing a store failed (disk full, file-size limit, I/O error); nothing was committed."""


class StoreCorruptError(EngramStoreError):
    """A file of the store is truncated, or a checksum does not match."""


class FingerprintMismatchError(EngramStoreError):
    """A store, checkpoint or counts file was made for a different hash config."""


class UnknownTableError(EngramStoreError, KeyError):
    """A table name the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRowIdsError(EngramStoreError, IndexError):
    """Row ids that are negative, out of range, or not integers."""


class InvalidValuesError(EngramStoreError, TypeError):
    """Values of the wrong shape or dtype for an update or a write."""


class BudgetError(EngramStoreError):
    """A memory budget the machine (or the device) cannot honour."""


class DeviceError(EngramStoreError):
    """A device this machine or this torch build lacks (``cuda`` without CUDA, ``cuda:N`` past the count), or a
    device string that names no device the store serves on."""


class StoreClosedError(EngramStoreError, RuntimeError):
    """An operation on a store that has been closed."""


class CheckpointError(EngramStoreError):
    """A model checkpoint (ours or a Hugging Face directory) is inconsistent: a config field, tensor, dtype or shape."""


class CountOverflowError(EngramStoreError, OverflowError):
    """A row access count would pass what a counts file holds per row (2**32 - 1)."""


class ShardLayoutError(EngramStoreError):
    """Shards built for another rank count or owner function, or ranks that opened different builds."""


class PeerFailureError(EngramStoreError, RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the group broke."""


class CollectiveOrderError(PeerFailureError):
    """Ranks issued collectives for different tables (or a different number of them)."""
