"""CPU training of EngramLM against the same backbone without Engram.

``train()`` reads a corpus (default: this Python's standard library sources), splits it by
file into train / held-out, trains a byte-level BPE tokenizer on the training part when none
is given, then trains EngramLM and the baseline on *identical* batches for the same number
of steps from the same backbone initialization, evaluates both on the held-out files and
saves the Engram checkpoint (the baseline's figures go into its config's ``extra``).

Deterministic for a given seed and step count. With ``minutes`` instead of ``steps`` the step
count is calibrated from a few timed steps and recorded, so ``steps=`` reproduces the run.
Engram memory rows get their own optimizer group (the paper: Adam, 5x learning rate, no
weight decay); the rest uses AdamW.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from engram_model.bpe import EOS, train_bpe
from engram_model.checkpoint import load_checkpoint, read_config, save_checkpoint
from engram_model.compression import CompressedTokenizer
from engram_model.corpus import expand_paths, read_text, split_files, stdlib_files
from engram_model.model import EngramLM, ModelConfig
from engram_store.errors import EngramStoreError, StoreCorruptError, StoreNotFoundError


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 800  # optimizer steps (both models)
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3  # backbone peak learning rate (AdamW)
    engram_lr_mult: float = 5.0  # memory rows: Adam at lr * this, no weight decay (the paper)
    weight_decay: float = 0.1
    warmup_steps: int = 20
    eval_windows: int = 256  # held-out windows of seq_len tokens
    held_out_fraction: float = 0.1  # fraction of files held out (split by path hash)
    vocab_size: int = 8192  # BPE vocabulary when no tokenizer is given
    max_train_bytes: int = 6_000_000  # cap on training text read (files in seeded random order)
    seed: int = 0
    model: dict = field(default_factory=dict)  # ModelConfig overrides (d_model, engram_layers, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A small backbone and moderate tables that train in a couple of minutes on 2 cores.
DEFAULT_MODEL = dict(d_model=128, n_layers=4, n_heads=4, mlp_mult=4, max_seq_len=128,
                     engram_layers=(1,), engram_table_sizes=(40000, 40000), engram_heads=4,
                     engram_head_dim=16)


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train_ids: np.ndarray  # int64 token stream, documents separated by <eos>
    held_ids: np.ndarray
    description: dict


def _read_capped(files: list[Path], cap: int, rng: np.random.Generator) -> list[str]:
    order = rng.permutation(len(files))
    texts, total = [], 0
    for i in order:
        if total >= cap:
            break
        t = read_text(files[i])
        if t.strip():
            texts.append(t)
            total += len(t)
    return texts


def _encode(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        if eos is not None:
            parts.append(np.array([eos], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prepare_corpus(corpus_paths, settings: TrainSettings, tokenizer: Tokenizer | None = None) -> Corpus:
    if corpus_paths is None:
        files, name = stdlib_files(), f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
    else:
        files, name = expand_paths(corpus_paths), "files"
    if not files:
        raise EngramStoreError("the corpus is empty: no files found under the given paths")
    rng = np.random.default_rng(settings.seed)
    train_files, held_files = split_files(files, settings.held_out_fraction)
    if train_files and held_files:
        train_texts = _read_capped(train_files, settings.max_train_bytes, rng)
        held_texts = _read_capped(held_files, max(settings.max_train_bytes // 8, 1), rng)
        split = "by-file"
    else:  # too few files to split by file: hold out the tail of the text instead
        texts = _read_capped(files, settings.max_train_bytes, rng)
        joined = "\n".join(texts)
        cut = int(len(joined) * (1 - settings.held_out_fraction))
        train_texts, held_texts = [joined[:cut]], [joined[cut:]]
        split = "by-offset"
    if not any(t.strip() for t in train_texts):
        raise EngramStoreError("the corpus is empty: the files contain no text")
    if tokenizer is None:
        tokenizer = train_bpe(train_texts, settings.vocab_size)
    train_ids, held_ids = _encode(tokenizer, train_texts), _encode(tokenizer, held_texts)
    need = settings.seq_len + 1
    if len(train_ids) < need or len(held_ids) < need:
        raise EngramStoreError(
            f"the corpus is too small: {len(train_ids)} training and {len(held_ids)} held-out tokens, "
            f"need at least {need} of each (give more text)"
        )
    description = dict(name=name, files=len(files), train_files=len(train_files), held_out_files=len(held_files),
                       split=split, train_tokens=int(len(train_ids)), held_out_tokens=int(len(held_ids)))
    return Corpus(tokenizer, train_ids, held_ids, description)


def model_config(settings: TrainSettings, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{**DEFAULT_MODEL, **settings.model, "max_seq_len": settings.seq_len})


def build_models(settings: TrainSettings, compression: CompressedTokenizer) -> tuple[EngramLM, EngramLM]:
    """(EngramLM, baseline) with bit-identical backbone initialization."""
    cfg = model_config(settings, compression.vocab_size)
    torch.manual_seed(settings.seed)
    engram = EngramLM(cfg, compression)
    torch.manual_seed(settings.seed)
    baseline = EngramLM(cfg.baseline())
    return engram, baseline


def make_optimizers(model: EngramLM, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """AdamW for the backbone; for the memory rows Adam at ``engram_lr_mult`` x lr, no weight decay,
    as SparseAdam (the moments of a row are updated when the row is looked up: lazy Adam)."""
    mem, decay, no_decay = model.param_groups()
    groups = [dict(params=decay, weight_decay=settings.weight_decay, lr=settings.lr, base_lr=settings.lr),
              dict(params=no_decay, weight_decay=0.0, lr=settings.lr, base_lr=settings.lr)]
    opts = [torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)]
    if mem:
        for table in model.tables.values():
            table.sparse = True
        lr = settings.lr * settings.engram_lr_mult
        opts.append(torch.optim.SparseAdam([dict(params=mem, lr=lr, base_lr=lr)], betas=(0.9, 0.95), eps=1e-8))
    return opts


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min((step - settings.warmup_steps) / span, 1.0)))


def batch_starts(n_tokens: int, settings: TrainSettings) -> np.ndarray:
    rng = np.random.default_rng(settings.seed + 1)
    return rng.integers(0, n_tokens - settings.seq_len - 1, size=(settings.steps, settings.batch_size))


def _batch(ids: torch.Tensor, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.as_tensor(starts, dtype=torch.int64).unsqueeze(1) + torch.arange(seq_len + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model: EngramLM, held_ids: np.ndarray, settings: TrainSettings) -> float:
    """Mean next-token loss over the first ``eval_windows`` non-overlapping held-out windows."""
    was_training = model.training
    model.eval()
    ids = torch.from_numpy(held_ids)
    n = min(settings.eval_windows, (len(held_ids) - 1) // settings.seq_len)
    starts = np.arange(n) * settings.seq_len
    total = 0.0
    for i in range(0, n, settings.batch_size):
        x, y = _batch(ids, starts[i:i + settings.batch_size], settings.seq_len)
        total += float(model.loss(x, y)) * len(x)
    model.train(was_training)
    return total / n


def train_model(model: EngramLM, corpus: Corpus, settings: TrainSettings, starts: np.ndarray, desc: str,
                progress: bool = True) -> dict:
    torch.manual_seed(settings.seed)
    opts = make_optimizers(model, settings)
    backbone = [p for g in opts[0].param_groups for p in g["params"]]
    ids = torch.from_numpy(corpus.train_ids)
    model.train()
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(len(starts)), desc=desc, disable=None if progress else True, unit="step", dynamic_ncols=True)
    for step in bar:
        f = lr_factor(step, settings)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
        x, y = _batch(ids, starts[step], settings.seq_len)
        loss = model.loss(x, y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone, 1.0)
        for opt in opts:
            opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == len(starts) - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    seconds = time.perf_counter() - t0
    return dict(train_loss=float(np.mean(losses[-20:])) if losses else float("nan"), seconds=seconds,
                held_out_loss=evaluate(model, corpus.held_ids, settings))


def _calibrate_steps(minutes: float, settings: TrainSettings, corpus: Corpus, compression, elapsed: float) -> int:
    """Steps that fit both models in the remaining time, from 3 timed steps of each."""
    probe = dataclasses.replace(settings, steps=4, warmup_steps=1)
    per_step = 0.0
    for model in build_models(probe, compression):
        starts = batch_starts(len(corpus.train_ids), probe)
        opts = make_optimizers(model, probe)
        ids = torch.from_numpy(corpus.train_ids)
        for step in range(4):
            if step == 1:
                t0 = time.perf_counter()
            x, y = _batch(ids, starts[step], probe.seq_len)
            loss = model.loss(x, y)
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
        per_step += (time.perf_counter() - t0) / 3
    per_step *= 1.08  # evaluation and bookkeeping
    return max(1, int((minutes * 60 - elapsed) / per_step))


def train(corpus_paths=None, out_dir=None, *, steps: int | None = None, minutes: float | None = None,
          seed: int = 0, tokenizer: Tokenizer | None = None, baseline: bool = True, progress: bool = True,
          **overrides) -> dict:
    """Train EngramLM (and the no-Engram baseline) and save the checkpoint to ``out_dir``.

    ``corpus_paths``: files / folders (plain or .gz); None = the standard library's sources.
    ``steps`` or ``minutes`` (total wall time budget for both models); ``overrides``: any
    TrainSettings field (``model={...}`` for ModelConfig fields). Returns the figures.
    """
    if steps is not None and minutes is not None:
        raise EngramStoreError("give steps or minutes, not both")
    start = time.perf_counter()
    settings = TrainSettings(seed=seed, **overrides)
    if steps is not None:
        if steps < 1:
            raise EngramStoreError(f"steps must be >= 1, got {steps}")
        settings = dataclasses.replace(settings, steps=int(steps))
    corpus = prepare_corpus(corpus_paths, settings, tokenizer)
    compression = CompressedTokenizer.from_tokenizer(corpus.tokenizer)
    if minutes is not None:
        n = _calibrate_steps(minutes if baseline else minutes * 1.6, settings, corpus, compression,
                             time.perf_counter() - start)
        settings = dataclasses.replace(settings, steps=n, warmup_steps=min(settings.warmup_steps, max(n // 10, 1)))
    engram, base = build_models(settings, compression)
    starts = batch_starts(len(corpus.train_ids), settings)
    result = dict(
        steps=settings.steps,
        tokens_per_step=settings.batch_size * settings.seq_len,
        compression_ratio=compression.ratio,
        vocab_size=compression.vocab_size,
        compressed_vocab_size=compression.compressed_vocab_size,
        corpus=corpus.description,
        engram_params=sum(p.numel() for p in engram.parameters()),
        memory_params=sum(p.numel() for p in engram.tables.parameters()),
        backbone_params=sum(p.numel() for p in base.parameters()),
    )
    result["engram"] = train_model(engram, corpus, settings, starts, "engram", progress)
    if baseline:
        result["baseline"] = train_model(base, corpus, settings, starts, "baseline", progress)
    result["held_out_loss"] = result["engram"]["held_out_loss"]
    result["baseline_held_out_loss"] = result["baseline"]["held_out_loss"] if baseline else None
    result["total_seconds"] = time.perf_counter() - start
    result["settings"] = settings.to_dict()
    if out_dir is not None:
        extra = dict(train=result, train_key=_train_key(corpus_paths, settings, tokenizer))
        save_checkpoint(out_dir, engram.eval(), corpus.tokenizer, extra=extra)
        result["checkpoint"] = str(out_dir)
    return result


def _train_key(corpus_paths, settings: TrainSettings, tokenizer: Tokenizer | None) -> str:
    if corpus_paths is None:
        files = stdlib_files()
        corpus = [sys.version, len(files)]
    else:
        files = expand_paths(corpus_paths)
        corpus = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    doc = dict(corpus=corpus, settings=settings.to_dict(), model=model_config(settings, settings.vocab_size).to_dict(),
               tokenizer=None if tokenizer is None else hashlib.sha256(tokenizer.to_str().encode()).hexdigest())
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# Demo: about 2 minutes for both models on 2 CPU cores.
DEMO_STEPS = 300


def train_or_reuse(out_dir, corpus_paths=None, *, steps: int = DEMO_STEPS, seed: int = 0, progress: bool = True,
                   **overrides) -> dict:
    """Like ``train(steps=...)``, but return the figures of a checkpoint in ``out_dir`` trained earlier with
    the same corpus and settings instead of training again."""
    settings = TrainSettings(seed=seed, **overrides)
    settings = dataclasses.replace(settings, steps=int(steps))
    key = _train_key(corpus_paths, settings, None)
    try:
        config = read_config(out_dir)
        if config.get("extra", {}).get("train_key") == key:
            load_checkpoint(out_dir)  # also checks the fingerprint
            return {**config["extra"]["train"], "checkpoint": str(out_dir), "reused": True}
    except (StoreNotFoundError, StoreCorruptError):
        pass
    result = train(corpus_paths, out_dir, steps=steps, seed=seed, progress=progress, **overrides)
    return {**result, "reused": False}
