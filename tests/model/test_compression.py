"""Tokenizer compression against a plain-Python reference of the normalization."""

import re
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from engram_model.bpe import train_bpe
from engram_model.compression import CompressedTokenizer, normalize_text
from engram_store.errors import EngramStoreError, InvalidRowIdsError


def ref_normalize(text):
    t = unicodedata.normalize("NFKC", text)
    t = unicodedata.normalize("NFD", t)
    t = "".join(c for c in t if unicodedata.category(c) != "Mn")
    t = t.lower()
    t = re.sub(r"[ \t\r\n]+", " ", t)
    return " " if t == " " else t.strip()


def ref_lookup(tok):
    keys, lookup = {}, []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            key = ref_normalize(text) or text
        lookup.append(keys.setdefault(key, len(keys)))
    return np.array(lookup)


def word_tokenizer(words):
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))


WORDS = ["<unk>", "The", "the", "THE", "café", "cafe", "Café", " ", "  ", "\t\n", "\n", "x  y", "x\ty",
         "ﬁ", "fi", "Ａ", "a", "naïve", "naive", " word ", "word"]


def test_normalization_cases():
    assert normalize_text("  Café\t\n") == "cafe"
    assert normalize_text(" ") == " "
    assert normalize_text("\t\n ") == " "  # collapses to one space, kept
    assert normalize_text("x \t y") == "x y"
    assert normalize_text("ﬁ") == "fi"  # NFKC
    assert normalize_text("Ａ") == "a"


def test_word_vocab_lookup_and_first_seen_order():
    tok = word_tokenizer(WORDS)
    c = CompressedTokenizer.from_tokenizer(tok)
    assert c.lookup.tolist() == ref_lookup(tok).tolist()
    ids = {w: i for i, w in enumerate(WORDS)}
    L = c.lookup
    assert L[ids["The"]] == L[ids["the"]] == L[ids["THE"]]
    assert L[ids["café"]] == L[ids["cafe"]] == L[ids["Café"]]
    assert L[ids[" "]] == L[ids["  "]] == L[ids["\t\n"]] == L[ids["\n"]]
    assert L[ids["x  y"]] == L[ids["x\ty"]]
    assert L[ids[" word "]] == L[ids["word"]]
    assert L[ids["ﬁ"]] == L[ids["fi"]] and L[ids["Ａ"]] == L[ids["a"]]
    # new ids are given in first-seen order: each new id is one more than the largest so far
    seen = -1
    for v in L:
        assert v <= seen + 1
        seen = max(seen, v)
    assert c.compressed_vocab_size == len(set(L.tolist()))
    assert c.ratio == pytest.approx(1 - c.compressed_vocab_size / len(WORDS))


def test_byte_level_bpe_matches_reference():
    texts = ["The Quick brown fox, THE quick Brown FOX.\n\tcafé Café naïve résumé — ünïcödé 日本語 ✓\n" * 3,
             "def f(x):\n    return x  # The end\n", "class Foo:\n\tpass\r\n"] * 5
    tok = train_bpe(texts, vocab_size=400)
    c = CompressedTokenizer.from_tokenizer(tok)
    ref = ref_lookup(tok)
    assert c.lookup.tolist() == ref.tolist()
    # byte-level pieces of multi-byte characters decode to U+FFFD and are keyed by the raw token
    raw = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
    assert raw, "expected partial UTF-8 tokens in a byte-level vocabulary"
    assert len({int(c.lookup[i]) for i in raw}) == len({tok.id_to_token(i) for i in raw})
    assert 0 < c.ratio < 1


def test_compress_arrays_tensors_and_errors():
    tok = word_tokenizer(WORDS)
    c = CompressedTokenizer.from_tokenizer(tok)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    out = c.compress(ids)
    assert isinstance(out, np.ndarray) and out.tolist() == c.lookup[ids].tolist()
    t = c.compress(torch.tensor(ids))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.tolist() == out.tolist()
    assert c.compress(torch.zeros(0, dtype=torch.long)).shape == (0,)
    for bad in ([len(WORDS)], [-1]):
        with pytest.raises(InvalidRowIdsError, match="outside the tokenizer's vocabulary"):
            c.compress(np.array(bad))
        with pytest.raises(InvalidRowIdsError):
            c.compress(torch.tensor(bad))
    with pytest.raises(InvalidRowIdsError):
        c.compress(np.array([1.5]))


def test_digest_stable_and_sensitive():
    c1 = CompressedTokenizer.from_tokenizer(word_tokenizer(WORDS))
    c2 = CompressedTokenizer.from_tokenizer(word_tokenizer(WORDS))
    c3 = CompressedTokenizer.from_tokenizer(word_tokenizer(WORDS[:-1] + ["other"]))
    assert c1.digest() == c2.digest() and len(c1.digest()) == 64
    assert c1.digest() != c3.digest()


def test_empty_vocabulary_and_corpus_rejected():
    with pytest.raises(EngramStoreError):
        CompressedTokenizer(np.array([], dtype=np.int64))
    with pytest.raises(EngramStoreError, match="empty"):
        train_bpe(["", "   \n"])


def test_dead_positions_pass_through_only_when_asked():
    tok = word_tokenizer(WORDS)
    c = CompressedTokenizer.from_tokenizer(tok)
    ids = np.array([[-1, 1, 2], [3, -1, -1]])
    want = [[-1 if i == -1 else int(c.lookup[i]) for i in row] for row in ids.tolist()]
    assert c.compress(ids, dead_ok=True).tolist() == want
    t = c.compress(torch.tensor(ids, dtype=torch.int32), dead_ok=True)
    assert t.dtype == torch.int64 and t.shape == (2, 3) and t.tolist() == want
    with pytest.raises(InvalidRowIdsError, match="dead_ok=True"):
        c.compress(ids)
    with pytest.raises(InvalidRowIdsError, match="outside"):
        c.compress(torch.tensor([0, -2]), dead_ok=True)
