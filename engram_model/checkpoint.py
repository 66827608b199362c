"""Checkpoints: a directory with ``model.safetensors``, ``config.json`` and ``tokenizer.json``.

config.json:
    {"format": "engram-lm", "format_version": 1,
     "model": ModelConfig.to_dict(), "hash": HashConfig.to_dict() | null,
     "fingerprint": hex | null, "compressed_vocab_size": int, "extra": {...}}

On load the compression table is rebuilt from tokenizer.json and the fingerprint recomputed:
a tokenizer that is not the one the model was trained with is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from engram_model.compression import CompressedTokenizer
from engram_model.hashing import HashConfig, NgramHasher, fingerprint
from engram_model.memory import ParamMemoryTable, table_name
from engram_model.model import EngramLM, ModelConfig
from engram_store.errors import (
    EngramStoreError,
    FingerprintMismatchError,
    StoreCorruptError,
    StoreNotFoundError,
)

FORMAT = "engram-lm"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.json", "tokenizer.json")


def save_checkpoint(dir, model: EngramLM, tokenizer: Tokenizer, extra: dict | None = None) -> Path:
    """Write the checkpoint into ``dir`` (created; existing files of the checkpoint are replaced)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [table_name(L) for L in model.config.engram_layers]
    missing = [n for n in names if not (n in model.tables and isinstance(model.tables[n], ParamMemoryTable))]
    if missing:
        raise EngramStoreError(
            f"tables {missing} are served from outside the model; a checkpoint needs them in memory "
            "(build the model with ParamMemoryTables)"
        )
    if tokenizer.get_vocab_size(with_added_tokens=True) != model.config.vocab_size:
        raise EngramStoreError("the tokenizer's vocabulary size differs from the model's")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "hash": model.hash_config.to_dict() if model.hash_config is not None else None,
        "fingerprint": model.fingerprint,
        "compressed_vocab_size": model.compression.compressed_vocab_size if model.compression else None,
        "extra": extra or {},
    }
    # Each file is written next to its destination and renamed into place.
    def atomic(name, write):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".partial")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    atomic("model.safetensors", lambda p: save_model(model, p, metadata={"format": FORMAT}))
    atomic("tokenizer.json", lambda p: tokenizer.save(p))
    atomic("config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


@dataclass
class Checkpoint:
    model: EngramLM
    tokenizer: Tokenizer
    compression: CompressedTokenizer
    hash_config: HashConfig | None
    hasher: NgramHasher | None
    fingerprint: str | None
    config: dict = field(default_factory=dict)  # the whole config.json
    path: Path | None = None

    @property
    def extra(self) -> dict:
        return self.config.get("extra", {})

    def engram_tables(self) -> dict[str, torch.Tensor]:
        """The memory rows, ``{"layer{L}": Tensor[rows, dim]}`` (detached, shared with the model)."""
        return {name: t.weight.detach() for name, t in self.model.tables.items()}


def read_config(dir) -> dict:
    path = Path(dir) / "config.json"
    if not path.is_file():
        raise StoreNotFoundError(f"{path} not found: not a checkpoint directory (train one with `engram-store train`)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreCorruptError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format") != FORMAT:
        raise StoreCorruptError(f"{path} is not an engram-lm checkpoint config")
    if config.get("format_version") != FORMAT_VERSION:
        raise StoreCorruptError(
            f"{path}: checkpoint format version {config.get('format_version')} is not supported (this is {FORMAT_VERSION})"
        )
    return config


def load_checkpoint(dir, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (model in eval mode); FingerprintMismatchError if the tokenizer is not the trained one."""
    root = Path(dir)
    for name in FILES:
        if not (root / name).is_file():
            raise StoreNotFoundError(f"{root / name} not found: checkpoint is incomplete")
    config = read_config(root)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    compression = CompressedTokenizer.from_tokenizer(tokenizer)
    model_config = ModelConfig.from_dict(config["model"])
    hash_config = HashConfig.from_dict(config["hash"]) if config.get("hash") else None
    recorded = config.get("fingerprint")
    if hash_config is not None:
        actual = fingerprint(hash_config, compression.lookup)
        if actual != recorded:
            raise FingerprintMismatchError(
                f"{root / 'tokenizer.json'} does not give the checkpoint's fingerprint "
                f"(recorded {recorded}, this tokenizer gives {actual}): the tokenizer was replaced or edited; "
                "use the tokenizer.json saved with the model"
            )
    if tokenizer.get_vocab_size(with_added_tokens=True) != model_config.vocab_size:
        raise FingerprintMismatchError("tokenizer.json's vocabulary size differs from the model's")
    model = EngramLM(model_config, compression, hash_config)
    missing, unexpected = load_model(model, str(root / "model.safetensors"), strict=False, device=str(map_location))
    missing = [k for k in missing if k != "head.weight"]  # tied to tok_emb
    if missing or unexpected:
        raise StoreCorruptError(
            f"{root / 'model.safetensors'} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.to(map_location).eval()
    return Checkpoint(model, tokenizer, compression, hash_config, model.hasher, recorded, config, root)
