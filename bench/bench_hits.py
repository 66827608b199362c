"""Script form of ``engram-store bench hits`` (same flags, same output): run from the repo root,
``python bench/bench_hits.py [--checkpoint CKPT --corpus PATH...] [--zipf 0.8,1.0,1.2] [--out DIR]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_store_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "hits", *sys.argv[1:]]))
