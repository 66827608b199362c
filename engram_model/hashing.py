"""Multi-head hashing of suffix N-grams over compressed ids, bit for bit as DeepSeek's reference.

For every Engram layer and every order n in 2..max_ngram, the N-gram ending at position t
(left-padded with the compressed pad id) is mixed in int64

    mix_n[t] = x[t]*m0 XOR x[t-1]*m1 XOR ... XOR x[t-n+1]*m_{n-1}

with the layer's odd multipliers ``m = 2*r + 1``,
``r = numpy.random.default_rng(seed + 10007*layer_id).integers(0, (INT64_MAX // V) // 2, max_ngram)``
(V = compressed vocabulary size), and head j of order n looks up ``mix_n % p_{n,j}``.
The moduli are distinct primes: per layer, per order, the search starts at
``table_size - 1`` and takes successively the next prime that no head of any layer used.

A layer's table is the concatenation of its heads' blocks (order-2 heads first), so the
global row of head k is ``offsets[k] + local index`` and the table has ``sum(primes)`` rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from engram_store.errors import EngramStoreError, InvalidRowIdsError

INT64_MAX = int(np.iinfo(np.int64).max)
LAYER_SEED_PRIME = 10007
FINGERPRINT_VERSION = "engram-hash-v1"

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for any 64-bit integer."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(after: int, used: set[int]) -> int:
    """Smallest prime > ``after`` not in ``used``."""
    candidate = after + 1
    while not (candidate not in used and is_prime(candidate)):
        candidate += 1
    return candidate


@dataclass(frozen=True)
class HashConfig:
    """Everything that decides which row an N-gram lands in."""

    compressed_vocab_size: int  # V: compressed ids are in [0, V)
    table_sizes: tuple[int, ...]  # per order 2..max_ngram: the size each head's prime starts from
    max_ngram: int = 3  # orders 2..max_ngram are hashed
    heads: int = 8  # hash heads per order
    layer_ids: tuple[int, ...] = (1,)  # 0-based block indices that carry an Engram
    pad_id: int = 0  # *compressed* id used to left-pad sequences
    seed: int = 0

    def __post_init__(self):
        def ints(name, value):
            try:
                return tuple(int(v) for v in value)
            except TypeError:
                raise EngramStoreError(f"HashConfig.{name} must be a sequence of ints, got {value!r}") from None

        object.__setattr__(self, "table_sizes", ints("table_sizes", self.table_sizes))
        object.__setattr__(self, "layer_ids", ints("layer_ids", self.layer_ids))
        for name in ("compressed_vocab_size", "max_ngram", "heads", "pad_id", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.compressed_vocab_size < 1:
            raise EngramStoreError(f"compressed_vocab_size must be >= 1, got {self.compressed_vocab_size}")
        if self.max_ngram < 2:
            raise EngramStoreError(f"max_ngram must be >= 2, got {self.max_ngram}")
        if self.heads < 1:
            raise EngramStoreError(f"heads must be >= 1, got {self.heads}")
        if len(self.table_sizes) != self.max_ngram - 1:
            raise EngramStoreError(
                f"table_sizes needs one size per order 2..{self.max_ngram} "
                f"({self.max_ngram - 1} values), got {len(self.table_sizes)}"
            )
        if any(s < 2 for s in self.table_sizes):
            raise EngramStoreError(f"table sizes must be >= 2, got {self.table_sizes}")
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids) or min(self.layer_ids) < 0:
            raise EngramStoreError(f"layer_ids must be distinct non-negative block indices, got {self.layer_ids}")
        if not 0 <= self.pad_id < self.compressed_vocab_size:
            raise EngramStoreError(
                f"pad_id {self.pad_id} is not a compressed id in [0, {self.compressed_vocab_size}); "
                "pass the pad token's compressed id (CompressedTokenizer.lookup[pad])"
            )

    @property
    def heads_per_layer(self) -> int:
        """K: hash heads of one layer, all orders together."""
        return (self.max_ngram - 1) * self.heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["table_sizes"] = list(self.table_sizes)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HashConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EngramStoreError(f"unknown hash config fields {sorted(unknown)}")
        return cls(**d)


def layer_multipliers(config: HashConfig, layer_id: int) -> np.ndarray:
    """The layer's odd int64 multipliers (length max_ngram); raises if they could overflow int64."""
    v = config.compressed_vocab_size
    half_bound = (INT64_MAX // v) // 2
    if half_bound < 1:
        raise EngramStoreError(
            f"compressed_vocab_size {v} is too large: no odd multiplier keeps id*multiplier "
            "inside int64 (needs compressed_vocab_size <= 2**62)"
        )
    rng = np.random.default_rng(config.seed + LAYER_SEED_PRIME * layer_id)
    r = rng.integers(0, half_bound, size=config.max_ngram, dtype=np.int64)
    mult = r * 2 + 1
    # (V-1) * m must fit: the products are XOR-ed, never summed, so this bounds the mix too.
    if int(mult.max()) > INT64_MAX // max(v - 1, 1):
        raise EngramStoreError(
            f"hash multipliers of layer {layer_id} would overflow int64 for vocabulary size {v}"
        )
    return mult


def layer_primes(config: HashConfig) -> dict[int, list[list[int]]]:
    """Per layer, per order, per head: the distinct prime table sizes."""
    used: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in config.layer_ids:
        per_order = []
        for size in config.table_sizes:
            start = size - 1
            heads = []
            for _ in range(config.heads):
                p = next_prime(start, used)
                used.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[layer_id] = per_order
    return out


class NgramHasher:
    """Vectorized torch hashing on the input's device."""

    def __init__(self, config: HashConfig):
        self.config = config
        self.primes = layer_primes(config)
        self.multipliers = {lid: layer_multipliers(config, lid) for lid in config.layer_ids}
        self.table_rows = {lid: int(sum(sum(o) for o in per)) for lid, per in self.primes.items()}
        self.offsets: dict[int, torch.Tensor] = {}
        for lid, per in self.primes.items():
            flat = [p for order in per for p in order]
            self.offsets[lid] = torch.tensor(np.cumsum([0] + flat[:-1]), dtype=torch.int64)
        self._device_cache: dict[tuple, torch.Tensor] = {}

    def _on(self, kind: str, lid: int, device: torch.device) -> torch.Tensor:
        key = (kind, lid, device)
        t = self._device_cache.get(key)
        if t is None:
            if kind == "mult":
                t = torch.from_numpy(self.multipliers[lid]).to(device)
            elif kind == "primes":
                t = torch.tensor(self.primes[lid], dtype=torch.int64, device=device)  # (orders, heads)
            else:
                t = self.offsets[lid].to(device)
            self._device_cache[key] = t
        return t

    def _validate(self, ids) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(np.asarray(ids))
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InvalidRowIdsError(f"compressed ids must be integers, got {ids.dtype}")
        if ids.dim() != 2:
            raise InvalidRowIdsError(f"compressed ids must have shape [B, T], got {tuple(ids.shape)}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            v = self.config.compressed_vocab_size
            if lo < 0 or hi >= v:
                raise InvalidRowIdsError(
                    f"compressed id {lo if lo < 0 else hi} is outside [0, {v}); "
                    "compress token ids with the checkpoint's CompressedTokenizer first"
                )
        return ids.to(torch.int64)

    def hash(self, compressed_ids) -> dict[int, torch.Tensor]:
        """Per layer: LongTensor[B, T, K] of per-head local indices (order-2 heads first)."""
        x = self._validate(compressed_ids)
        B, T = x.shape
        n = self.config.max_ngram
        pad = self.config.pad_id
        # shifted[k][:, t] = x[:, t-k], left-padded with the pad id
        shifted = [x]
        for k in range(1, n):
            s = torch.full_like(x, pad)
            if k < T:
                s[:, k:] = x[:, : T - k]
            shifted.append(s)
        out = {}
        for lid in self.config.layer_ids:
            m = self._on("mult", lid, x.device)
            primes = self._on("primes", lid, x.device)
            mix = shifted[0] * m[0]
            per_order = []
            for order in range(2, n + 1):
                mix = torch.bitwise_xor(mix, shifted[order - 1] * m[order - 1])
                per_order.append(torch.remainder(mix.unsqueeze(-1), primes[order - 2]))  # (B, T, heads)
            out[lid] = torch.cat(per_order, dim=-1)
        return out

    def row_ids(self, compressed_ids) -> dict[int, torch.Tensor]:
        """Per layer: LongTensor[B, T, K] of global rows into the layer's table (hash + offsets)."""
        local = self.hash(compressed_ids)
        return {lid: h + self._on("offsets", lid, h.device) for lid, h in local.items()}


def fingerprint(config: HashConfig, compression_lookup) -> str:
    """Hex sha256 of the hash config and the compression table: same on every process and machine."""
    lookup = np.ascontiguousarray(np.asarray(compression_lookup, dtype=np.int64))
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION.encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    h.update(lookup.astype("<i8", copy=False).tobytes())
    return h.hexdigest()
