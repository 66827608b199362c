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

Dead positions (DeepSeek-V4.1: image tokens, token id ``DEAD`` = -1) cut the sequence: a lookback
that would reach or cross a dead position reads the pad instead, exactly as if the sequence
started again after it, and a dead position itself looks up no row (``hash_live`` /
``row_ids_live`` return its rows as ``DEAD_ROW`` with ``live`` False, for the engine to zero).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from engram_store.errors import CheckpointError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError

INT64_MAX = int(np.iinfo(np.int64).max)
LAYER_SEED_PRIME = 10007
FINGERPRINT_VERSION = "engram-hash-v1"
DEAD = -1  # token id (original or compressed) of a dead position
DEAD_ROW = -1  # row id given to a dead position: negative, so a store refuses it if it is not masked out

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

    @classmethod
    def from_hf_config(cls, config: dict, compression) -> "HashConfig":
        """The hash config of a Hugging Face Engram checkpoint (DeepSeek-V4.1's ``config.json``).

        ``config`` is the whole config.json dict: the ``engram_*`` fields are read under
        ``text_config`` or, failing that, at the top level. ``compression`` is the
        CompressedTokenizer (or its lookup array) of the checkpoint's tokenizer.json: the pad is
        the compressed id of the *original* token ``engram_pad_token_id``, and its compressed
        vocabulary must be ``engram_compressed_vocab_size``. ``engram_vocab_size`` (one int, or one
        per order) is where each order's prime search starts; the seed is 0 (V4.1 has no seed
        field). Raises CheckpointError for a missing or malformed field and when a layer's primes
        do not sum to its ``engram_num_embeddings``, FingerprintMismatchError when the tokenizer
        does not compress to the config's vocabulary.
        """
        return _from_hf_config(cls, config, compression)


_MAX_HF_LIST = 1024  # entries of a list field (layer ids, table sizes)


def _hf_fields(config) -> dict:
    """The engram_* fields of a config.json dict (under text_config, or at the top level)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json must be a JSON object, got {type(config).__name__}")
    text = config.get("text_config")
    has_engram = isinstance(text, dict) and any(str(k).startswith("engram_") for k in text)
    fields = text if has_engram else config
    where = "text_config" if fields is text else "the top level"
    required = ("engram_layer_ids", "engram_max_ngram_size", "engram_n_heads", "engram_vocab_size",
                "engram_num_embeddings", "engram_compressed_vocab_size", "engram_pad_token_id")
    missing = [f for f in required if f not in fields]
    if missing:
        raise CheckpointError(
            f"config.json lacks {', '.join(missing)} (looked under {where}); an Engram checkpoint's config "
            "names them all (DeepSeek-V4.1: under text_config)"
        )

    # Upper bounds far above any real model (V4.1: 8 heads, orders up to 4, 16 M, 384 M rows) keep a
    # malformed config from starting a prime search that never ends.
    def integer(name, value, low, high=2**62):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointError(f"config.json {name} must be an integer >= {low}, got {value!r}")
        if value > high:
            raise CheckpointError(f"config.json {name} must be an integer <= {high}, got {value!r}")
        return value

    def integers(name, low, count=None):
        value = fields[name]
        values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(values, list) or not values or len(values) > _MAX_HF_LIST:
            raise CheckpointError(f"config.json {name} must be an integer or a non-empty list of at most "
                                  f"{_MAX_HF_LIST} of them, got {value!r}")
        values = [integer(f"{name}[{i}]", v, low) for i, v in enumerate(values)]
        if count is not None and len(values) != count and len(values) != 1:
            raise CheckpointError(f"config.json {name} has {len(values)} entries, expected {count} (or one for all)")
        return values if count is None or len(values) == count else values * count

    out = {"layer_ids": integers("engram_layer_ids", 0)}
    out["max_ngram"] = integer("engram_max_ngram_size", fields["engram_max_ngram_size"], 2, 64)
    out["heads"] = integer("engram_n_heads", fields["engram_n_heads"], 1, 4096)
    out["table_sizes"] = integers("engram_vocab_size", 2, count=out["max_ngram"] - 1)
    out["num_embeddings"] = integers("engram_num_embeddings", 1, count=len(out["layer_ids"]))
    out["compressed_vocab_size"] = integer("engram_compressed_vocab_size", fields["engram_compressed_vocab_size"], 1)
    out["pad_token_id"] = integer("engram_pad_token_id", fields["engram_pad_token_id"], 0)
    return out


def _from_hf_config(cls, config, compression) -> HashConfig:
    f = _hf_fields(config)
    lookup = np.asarray(getattr(compression, "lookup", compression))
    if lookup.ndim != 1 or lookup.size == 0 or lookup.dtype.kind not in "iu":
        raise CheckpointError("compression must be the checkpoint tokenizer's CompressedTokenizer (or its lookup array)")
    got = int(lookup.max()) + 1
    if got != f["compressed_vocab_size"]:
        raise FingerprintMismatchError(
            f"the tokenizer compresses to {got} ids but config.json says engram_compressed_vocab_size "
            f"{f['compressed_vocab_size']}: use the tokenizer.json shipped with the checkpoint"
        )
    if f["pad_token_id"] >= lookup.size:
        raise CheckpointError(
            f"config.json engram_pad_token_id {f['pad_token_id']} is not a token id of the tokenizer "
            f"(0..{lookup.size - 1}); use the checkpoint's own tokenizer.json"
        )
    try:
        hc = cls(
            compressed_vocab_size=f["compressed_vocab_size"],
            table_sizes=tuple(f["table_sizes"]),
            max_ngram=f["max_ngram"],
            heads=f["heads"],
            layer_ids=tuple(f["layer_ids"]),
            pad_id=int(lookup[f["pad_token_id"]]),
            seed=0,
        )
    except CheckpointError:
        raise
    except EngramStoreError as e:
        raise CheckpointError(f"config.json engram_* fields do not make a hash config: {e}") from None
    floor = hc.heads * sum(hc.table_sizes)  # every head's prime is at least its order's engram_vocab_size
    for layer_id, rows in zip(hc.layer_ids, f["num_embeddings"]):
        if rows < floor:
            raise CheckpointError(
                f"config.json engram_num_embeddings gives layer {layer_id} {rows} rows, fewer than its "
                f"{hc.max_ngram - 1}x{hc.heads} head primes from engram_vocab_size {list(hc.table_sizes)} can sum "
                f"to (>= {floor}): the config is edited or not this hash; fix engram_num_embeddings or "
                "engram_vocab_size")
    primes = layer_primes(hc)
    for layer_id, rows in zip(hc.layer_ids, f["num_embeddings"]):
        total = sum(sum(order) for order in primes[layer_id])
        if total != rows:
            raise CheckpointError(
                f"config.json engram_num_embeddings gives layer {layer_id} {rows} rows, but its "
                f"{hc.max_ngram - 1}x{hc.heads} head primes searched from engram_vocab_size "
                f"{list(hc.table_sizes)} sum to {total}: the config is edited or not this hash; fix "
                "engram_num_embeddings or engram_vocab_size"
            )
    return hc


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

    def _validate(self, ids, dead_ok: bool = False) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(np.asarray(ids))
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InvalidRowIdsError(f"compressed ids must be integers, got {ids.dtype}")
        if ids.dim() != 2:
            raise InvalidRowIdsError(f"compressed ids must have shape [B, T], got {tuple(ids.shape)}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            v = self.config.compressed_vocab_size
            low = DEAD if dead_ok else 0
            if lo < low or hi >= v:
                hint = (f"{DEAD} marks a dead position; " if dead_ok else
                        f"for dead positions ({DEAD}) use hash_live / row_ids_live; ")
                raise InvalidRowIdsError(
                    f"compressed id {lo if lo < low else hi} is outside [0, {v}); {hint}"
                    "compress token ids with the checkpoint's CompressedTokenizer first"
                )
        return ids.to(torch.int64)

    def _lookbacks(self, x: torch.Tensor, dead: torch.Tensor | None) -> list[torch.Tensor]:
        """shifted[k][:, t] = x[:, t-k], or the pad where t-k < 0 or a dead position lies in t-k..t."""
        B, T = x.shape
        pad = self.config.pad_id
        if dead is not None:
            pos = torch.arange(T, device=x.device)
            # last_dead[b, t]: the latest dead position <= t (-1 if none); t-k reads the pad iff t-k <= it
            last_dead = torch.where(dead, pos, -1).cummax(dim=1).values
            x = torch.where(dead, pad, x)
        shifted = [x]
        for k in range(1, self.config.max_ngram):
            s = torch.full_like(x, pad)
            if k < T:
                s[:, k:] = x[:, : T - k]
            if dead is not None:
                s = torch.where(pos - k <= last_dead, pad, s)
            shifted.append(s)
        return shifted

    def _mix(self, shifted: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        device = shifted[0].device
        out = {}
        for lid in self.config.layer_ids:
            m = self._on("mult", lid, device)
            primes = self._on("primes", lid, device)
            mix = shifted[0] * m[0]
            per_order = []
            for order in range(2, self.config.max_ngram + 1):
                mix = torch.bitwise_xor(mix, shifted[order - 1] * m[order - 1])
                per_order.append(torch.remainder(mix.unsqueeze(-1), primes[order - 2]))  # (B, T, heads)
            out[lid] = torch.cat(per_order, dim=-1)
        return out

    def hash(self, compressed_ids) -> dict[int, torch.Tensor]:
        """Per layer: LongTensor[B, T, K] of per-head local indices (order-2 heads first)."""
        return self._mix(self._lookbacks(self._validate(compressed_ids), None))

    def row_ids(self, compressed_ids) -> dict[int, torch.Tensor]:
        """Per layer: LongTensor[B, T, K] of global rows into the layer's table (hash + offsets)."""
        local = self.hash(compressed_ids)
        return {lid: h + self._on("offsets", lid, h.device) for lid, h in local.items()}

    def hash_live(self, compressed_ids) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Like ``hash`` over ids where ``DEAD`` (-1) marks dead positions: (per layer [B, T, K], live [B, T]).

        Lookbacks stop at a dead position (they read the pad), and a dead position's own entries
        are ``DEAD_ROW``: the caller fetches only ``rows[live]`` and zeros the rest (gate 0).
        """
        x = self._validate(compressed_ids, dead_ok=True)
        dead = x == DEAD
        live = ~dead
        local = self._mix(self._lookbacks(x, dead))
        return {lid: h.masked_fill_(dead.unsqueeze(-1), DEAD_ROW) for lid, h in local.items()}, live

    def row_ids_live(self, compressed_ids) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Like ``row_ids`` with dead positions: (per layer LongTensor[B, T, K] of rows, BoolTensor live [B, T]).

        Rows of dead positions are ``DEAD_ROW`` (-1), which no store accepts: pass ``rows[live]``
        (shape [N_live, K]) to the store and scatter the result back into zeros.
        """
        local, live = self.hash_live(compressed_ids)
        dead = ~live.unsqueeze(-1)
        return {lid: (h + self._on("offsets", lid, h.device)).masked_fill_(dead, DEAD_ROW)
                for lid, h in local.items()}, live


def fingerprint(config: HashConfig, compression_lookup) -> str:
    """Hex sha256 of the hash config and the compression table: same on every process and machine."""
    lookup = np.ascontiguousarray(np.asarray(compression_lookup, dtype=np.int64))
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION.encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    h.update(lookup.astype("<i8", copy=False).tobytes())
    return h.hexdigest()
