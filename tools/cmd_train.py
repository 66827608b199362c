"""``engram-store train``: train a small EngramLM (and its no-Engram baseline) on a CPU."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    from engram_model.train import TrainSettings

    d = TrainSettings()
    p = subparsers.add_parser(
        "train",
        help="train a small Engram language model on a CPU and save a checkpoint",
        description="Train EngramLM and the same backbone without Engram on identical batches, "
        "report both held-out losses, and save the Engram checkpoint (model.safetensors, config.json, "
        "tokenizer.json). Without --corpus the running Python's standard-library sources are used; "
        "a byte-level BPE tokenizer is trained on the training files.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="text files or folders (plain or .gz); default: the Python standard library")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps for each model (default: {d.steps})")
    budget.add_argument("--minutes", type=float, metavar="M",
                        help="wall-time budget for both models; the step count is calibrated and recorded")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"BPE vocabulary when the tokenizer is trained (default: {d.vocab_size})")
    p.add_argument("--tokenizer", metavar="FILE", help="an existing tokenizer.json to use instead of training one")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-Engram baseline (default: train it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from tokenizers import Tokenizer

    from engram_model.train import train
    from engram_store.errors import StoreNotFoundError

    tokenizer = None
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            raise StoreNotFoundError(f"tokenizer file {args.tokenizer} does not exist")
        tokenizer = Tokenizer.from_file(args.tokenizer)
    steps = args.steps
    if steps is None and args.minutes is None:
        from engram_model.train import TrainSettings
        steps = TrainSettings().steps
    result = train(args.corpus, args.out, steps=steps, minutes=args.minutes, seed=args.seed,
                   tokenizer=tokenizer, baseline=not args.no_baseline, progress=not args.quiet,
                   batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, sort_keys=True))
        return 0
    c = result["corpus"]
    print(f"corpus: {c['name']}, {c['train_files']} train / {c['held_out_files']} held-out files, "
          f"{c['train_tokens']:,} / {c['held_out_tokens']:,} tokens")
    print(f"tokenizer: {result['vocab_size']:,} ids -> {result['compressed_vocab_size']:,} compressed "
          f"({result['compression_ratio']:.2%} fewer)")
    print(f"steps: {result['steps']} x {result['tokens_per_step']} tokens; "
          f"backbone {result['backbone_params']:,} params, Engram memory {result['memory_params']:,} params")
    print(f"held-out loss: Engram {result['held_out_loss']:.4f}  ({result['engram']['seconds']:.0f} s)")
    if result.get("baseline_held_out_loss") is not None:
        print(f"held-out loss: baseline {result['baseline_held_out_loss']:.4f}  ({result['baseline']['seconds']:.0f} s)")
    print(f"checkpoint: {result['checkpoint']}")
    return 0
