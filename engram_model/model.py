"""EngramLM: a small causal Transformer with Engram layers (and the same backbone without them).

Data flow of ``forward(input_ids)``:
    compress ids -> hash once (all Engram layers) -> prefetch every layer's rows
    -> token + position embedding -> blocks; at an Engram block: wait() for its rows,
       h += Engram(h, rows), then attention and MLP (pre-norm residual).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.compression import CompressedTokenizer
from engram_model.engram import Engram
from engram_model.hashing import HashConfig, NgramHasher, fingerprint
from engram_model.memory import MemoryTable, ParamMemoryTable, table_name
from engram_store.errors import EngramStoreError, InvalidRowIdsError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # original tokenizer vocabulary (incl. special tokens)
    d_model: int = 160  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_mult: int = 4  # MLP hidden = mlp_mult * d_model
    max_seq_len: int = 128  # learned positions
    pad_token_id: int = 0  # original id of the pad token (its compressed id pads N-grams)
    engram_layers: tuple[int, ...] = (1,)  # 0-based blocks carrying an Engram; () = baseline
    engram_table_sizes: tuple[int, ...] = (20000, 20000)  # per order 2..max_ngram, per head (prime >= this)
    engram_heads: int = 8  # hash heads per order
    engram_head_dim: int = 16  # embedding dim of one head's row (= store table dim)
    max_ngram: int = 3
    kernel_size: int = 4  # short conv kernel (dilation = max_ngram)
    hash_seed: int = 0
    engram_init_std: float = 0.02  # N(0, std) init of the memory rows (same scale as the token embedding)

    def __post_init__(self):
        object.__setattr__(self, "engram_layers", tuple(int(x) for x in self.engram_layers))
        object.__setattr__(self, "engram_table_sizes", tuple(int(x) for x in self.engram_table_sizes))
        if self.d_model % self.n_heads:
            raise EngramStoreError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        bad = [L for L in self.engram_layers if not 0 <= L < self.n_layers]
        if bad:
            raise EngramStoreError(f"engram layers {bad} are not block indices in [0, {self.n_layers})")

    @property
    def has_engram(self) -> bool:
        return bool(self.engram_layers)

    def baseline(self) -> "ModelConfig":
        """The same backbone without Engram."""
        return dataclasses.replace(self, engram_layers=())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["engram_layers"] = list(self.engram_layers)
        d["engram_table_sizes"] = list(self.engram_table_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def make_hash_config(config: ModelConfig, compression: CompressedTokenizer) -> HashConfig:
    """The hash config of a model config over a tokenizer's compression table."""
    return HashConfig(
        compressed_vocab_size=compression.compressed_vocab_size,
        table_sizes=config.engram_table_sizes,
        max_ngram=config.max_ngram,
        heads=config.engram_heads,
        layer_ids=config.engram_layers,
        pad_id=int(compression.lookup[config.pad_token_id]),
        seed=config.hash_seed,
    )


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.norm1 = nn.RMSNorm(d)
        self.attn = Attention(d, config.n_heads)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_mult * d), nn.GELU(), nn.Linear(config.mlp_mult * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EngramLM(nn.Module):
    """Causal LM; Engram at ``config.engram_layers`` (none: the baseline)."""

    def __init__(self, config: ModelConfig, compression: CompressedTokenizer | None = None,
                 hash_config: HashConfig | None = None):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        self.compression = compression
        self.hash_config = None
        self.hasher = None
        self.engrams = nn.ModuleDict()
        self.tables = nn.ModuleDict()  # trainable ParamMemoryTables, keyed "layer{L}"
        self._memory: dict[int, MemoryTable] = {}
        self._init_weights()
        if config.has_engram:
            if compression is None:
                raise EngramStoreError("an Engram model needs the tokenizer's CompressedTokenizer")
            if compression.vocab_size != config.vocab_size:
                raise EngramStoreError(
                    f"compression table covers {compression.vocab_size} ids, the model {config.vocab_size}"
                )
            expected = make_hash_config(config, compression)
            if hash_config is None:
                hash_config = expected
            elif hash_config != expected:
                raise EngramStoreError(f"hash config {hash_config} does not match the model config ({expected})")
            self.hash_config = hash_config
            self.hasher = NgramHasher(hash_config)
            k = hash_config.heads_per_layer
            for L in config.engram_layers:
                self.engrams[str(L)] = Engram(config.d_model, k, config.engram_head_dim, hc_mult=1,
                                              kernel_size=config.kernel_size, max_ngram=config.max_ngram)
                self._init_linears(self.engrams[str(L)])
                table = ParamMemoryTable(self.hasher.table_rows[L], config.engram_head_dim, config.engram_init_std)
                self.tables[table_name(L)] = table
                self._memory[L] = table

    # -- init -----------------------------------------------------------------------------
    @staticmethod
    def _init_linears(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _init_weights(self) -> None:
        self._init_linears(self)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    # -- memory ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str | None:
        if self.hash_config is None:
            return None
        return fingerprint(self.hash_config, self.compression.lookup)

    def memory(self) -> dict[int, MemoryTable]:
        return dict(self._memory)

    def set_memory(self, tables: dict[int, MemoryTable]) -> None:
        """Swap the memory table of Engram layers (e.g. for a store's tables when serving).

        A table that is not an nn.Module (a store's) replaces the trainable parameter, which is
        dropped from the model (and from its state_dict).
        """
        for L, table in tables.items():
            L = int(L)
            if L not in self._memory:
                raise EngramStoreError(f"layer {L} has no Engram (Engram layers: {list(self._memory)})")
            rows, dim = self.hasher.table_rows[L], self.config.engram_head_dim
            if int(table.rows) != rows or int(table.dim) != dim:
                raise EngramStoreError(
                    f"table for layer {L} has shape [{table.rows}, {table.dim}], the model needs [{rows}, {dim}]"
                )
            name = table_name(L)
            if isinstance(table, nn.Module):
                self.tables[name] = table
            elif name in self.tables:
                del self.tables[name]
            self._memory[L] = table

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) original token ids -> logits (B, T, vocab)."""
        if input_ids.dim() != 2:
            raise InvalidRowIdsError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise EngramStoreError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise InvalidRowIdsError(
                    f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})"
                )
        pending = {}
        if self._memory:
            row_ids = self.hasher.row_ids(self.compression.compress(input_ids))
            pending = {L: self._memory[L].prefetch(row_ids[L]) for L in self.config.engram_layers}
        pos = torch.arange(T, device=input_ids.device)
        h = self.tok_emb(input_ids) + self.pos_emb(pos)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            if i in pending:
                rows = pending.pop(i).wait().to(h.device)  # (B, T, K, head_dim)
                h = h + self.engrams[str(i)](h.unsqueeze(2), rows).squeeze(2)
            h = block(h)
        return self.head(self.norm_f(h))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward(input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(memory rows, matrices that get weight decay, everything else)."""
        memory = {id(p) for p in self.tables.parameters()}
        mem, decay, no_decay = [], [], []
        for p in self.parameters():
            if id(p) in memory:
                mem.append(p)
            elif p.dim() >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        return mem, decay, no_decay
