"""The README's main job: train → count → plan → build → serve held-out text from the store.

Everything runs on what every machine has: the Python standard library's own sources are the
corpus (split by file into training and held-out parts, as training splits them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from engram_pipeline.build import build_from_checkpoint
from engram_pipeline.counts import count_corpus
from engram_pipeline.plan import overall
from engram_store.store import open as open_store
from engram_model.memory import table_name


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _count_files(train_files: list[Path], cap_bytes: int, seed: int) -> list[Path]:
    """A seeded sample of the training files, about ``cap_bytes`` of text."""
    order = np.random.default_rng(seed).permutation(len(train_files))
    picked, total = [], 0
    for i in order:
        if total >= cap_bytes:
            break
        picked.append(train_files[i])
        total += train_files[i].stat().st_size
    return sorted(picked)


def run_demo(workdir="engram-demo", *, steps: int | None = None, hbm_fraction: float = 0.01,
             dram_fraction: float = 0.10, backend: str = "mmap", count_bytes: int = 6_000_000,
             progress: bool = True) -> dict:
    """Run the whole pipeline in ``workdir`` (reusing a checkpoint trained there before)."""
    from engram_model.checkpoint import load_checkpoint
    from engram_model.corpus import split_files, stdlib_files
    from engram_model.train import DEMO_STEPS, TrainSettings, evaluate, prepare_corpus, train_or_reuse

    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, counts_path, store_dir = workdir / "checkpoint", workdir / "counts.npz", workdir / "store"

    _say("1/5 train EngramLM and the no-Engram baseline on the standard library's sources")
    trained = train_or_reuse(ckpt_dir, steps=steps or DEMO_STEPS, progress=progress)
    _say(f"    {'reused' if trained['reused'] else 'trained'} {ckpt_dir}: held-out loss Engram "
         f"{trained['held_out_loss']:.4f} vs baseline {trained['baseline_held_out_loss']:.4f}")
    ckpt = load_checkpoint(ckpt_dir)
    settings = TrainSettings(**{k: v for k, v in trained["settings"].items()})

    _say("2/5 count N-gram row accesses on part of the training files")
    train_files, held_files = split_files(stdlib_files(), settings.held_out_fraction)
    counted_files = _count_files(train_files, count_bytes, settings.seed)
    counts, count_report = count_corpus(ckpt_dir, counted_files, progress=progress)
    counts.save(counts_path)
    _say(f"    {count_report['tokens']:,} tokens at {count_report['tokens_per_s']:,.0f} tokens/s")

    _say("3/5 plan tiers and build the store")
    table_bytes = sum(t.numel() * t.element_size() for t in ckpt.engram_tables().values())
    hbm, dram = int(table_bytes * hbm_fraction), int(table_bytes * dram_fraction)
    built = build_from_checkpoint(ckpt_dir, counts, store_dir, hbm_bytes=hbm, dram_bytes=dram, backend=backend,
                                  overwrite=True)
    from engram_pipeline.plan import TablePlan

    plan = {n: TablePlan(**p) for n, p in built["plan"].items()}
    predicted = overall(plan, counts)
    _say(f"    tables {table_bytes / 2**20:.1f} MiB; HBM {hbm / 2**20:.2f} MiB, DRAM {dram / 2**20:.2f} MiB, rest on disk")

    _say("4/5 replay the counted text through the store: measured hit rates against the plan's")
    with open_store(store_dir, device="cpu", hbm_bytes=hbm, dram_bytes=dram, fingerprint=ckpt.fingerprint) as store:
        same_text = replay_text(store, ckpt, counted_files)

    _say("5/5 evaluate held-out text: in-memory model, then the same model served from the store")
    corpus = prepare_corpus(None, settings, tokenizer=ckpt.tokenizer)
    t = time.perf_counter()
    loss_memory = evaluate(ckpt.model, corpus.held_ids, settings)
    seconds_memory = time.perf_counter() - t
    with open_store(store_dir, device="cpu", hbm_bytes=hbm, dram_bytes=dram, fingerprint=ckpt.fingerprint) as store:
        # The same model, its in-memory tables now swapped for the store's (its loss above is taken).
        ckpt.model.set_memory({L: store.table(table_name(L)) for L in ckpt.hash_config.layer_ids})
        t = time.perf_counter()
        loss_store = evaluate(ckpt.model, corpus.held_ids, settings)
        seconds_store = time.perf_counter() - t
        stats = store.stats()
    measured = _tier_rates(stats)

    result = {
        "held_out_loss": {"in_memory": loss_memory, "store_served": loss_store,
                          "equal": loss_memory == loss_store, "baseline_no_engram": trained["baseline_held_out_loss"]},
        "hit_rates": {"predicted_by_plan": predicted, "measured_same_text": same_text,
                      "measured_held_out": measured},
        "eval_seconds": {"in_memory": seconds_memory, "store_served": seconds_store},
        "budgets_bytes": {"hbm": hbm, "dram": dram, "tables": table_bytes},
        "counting": count_report,
        "files": {"workdir": str(workdir), "checkpoint": str(ckpt_dir), "counts": str(counts_path),
                  "store": str(store_dir)},
        "seconds": time.perf_counter() - t0,
    }
    print()
    print("| | in-memory table | served from store | no Engram |")
    print("|---|---:|---:|---:|")
    print(f"| held-out loss | {loss_memory:.6f} | {loss_store:.6f} | {trained['baseline_held_out_loss']:.6f} |")
    print(f"| eval seconds | {seconds_memory:.2f} | {seconds_store:.2f} | |")
    print()
    print("| tier | predicted by plan (counted text) | measured, same text | measured, held-out text |")
    print("|---|---:|---:|---:|")
    for tier in ("hbm", "dram", "disk"):
        print(f"| {tier} | {predicted[tier]:.1%} | {same_text[tier]:.1%} | {measured[tier]:.1%} |")
    print()
    print(f"losses agree: {'yes, bit for bit' if loss_memory == loss_store else 'NO'}; "
          f"files under {workdir}/ (checkpoint/, counts.npz, store/); {result['seconds']:.0f} s in all")
    print(json.dumps(result))
    return result


def _tier_rates(stats: dict) -> dict[str, float]:
    """Share of row accesses (every id, repeats within a batch included, like the plan's counts)
    served by each tier, over all tables."""
    got = {tier: sum(s[tier]["accesses"] for s in stats.values()) for tier in ("hbm", "dram", "disk")}
    total = max(sum(got.values()), 1)
    return {tier: n / total for tier, n in got.items()}


def replay_text(store, ckpt, files, window: int = 1024) -> dict[str, float]:
    """Prefetch and wait every Engram row of ``files`` through ``store``, ``window`` tokens at a
    time (no model), and return the measured access-weighted hit rate per tier."""
    from engram_model.corpus import iter_texts

    for text in iter_texts(files):
        ids = np.asarray(ckpt.tokenizer.encode(text).ids, dtype=np.int64)
        if ids.size == 0:
            continue
        rows = ckpt.hasher.row_ids(torch.as_tensor(ckpt.compression.compress(ids))[None])
        for s in range(0, ids.size, window):
            handles = [store.prefetch(table_name(L), r[:, s:s + window]) for L, r in rows.items()]
            for h in handles:
                h.wait()
    return _tier_rates(store.stats())
