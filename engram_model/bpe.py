"""A byte-level BPE tokenizer trained with Hugging Face ``tokenizers`` (used when none is given)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_store.errors import EngramStoreError

PAD = "<pad>"
EOS = "<eos>"
SPECIAL_TOKENS = (PAD, EOS)  # ids 0 and 1


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; ids 0/1 are ``<pad>``/``<eos>``."""
    texts = [t for t in texts if t]
    if not texts or not any(t.strip() for t in texts):
        raise EngramStoreError("the corpus is empty: give files that contain text (or no --corpus for the stdlib)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok
