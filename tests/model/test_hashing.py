"""N-gram hashing against an independent plain-loop reference (Python ints, trial-division primes)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engram_model.hashing import HashConfig, NgramHasher, fingerprint
from engram_store.errors import EngramStoreError, InvalidRowIdsError
from hash_reference import ref_is_prime

INT64_MAX = 2**63 - 1


# ---- the reference, written from the description, sharing no code with engram_model ----------


def ref_primes(table_sizes, heads, layer_ids):
    seen = set()
    out = {}
    for layer in layer_ids:
        out[layer] = []
        for size in table_sizes:
            cur = size - 1
            heads_primes = []
            for _ in range(heads):
                c = cur + 1
                while c in seen or not ref_is_prime(c):
                    c += 1
                seen.add(c)
                heads_primes.append(c)
                cur = c
            out[layer].append(heads_primes)
    return out


def ref_multipliers(vocab, max_ngram, seed, layer):
    bound = (INT64_MAX // vocab) // 2
    r = np.random.default_rng(seed + 10007 * layer).integers(0, bound, size=max_ngram)
    return [2 * int(v) + 1 for v in r]


def wrap64(v):
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def ref_hash(ids, vocab, table_sizes, max_ngram, heads, layer_ids, pad, seed):
    primes = ref_primes(table_sizes, heads, layer_ids)
    out = {}
    for layer in layer_ids:
        m = ref_multipliers(vocab, max_ngram, seed, layer)
        res = []
        for row in ids:
            row_out = []
            for t in range(len(row)):
                tok = [row[t - k] if t - k >= 0 else pad for k in range(max_ngram)]
                feats = []
                for n in range(2, max_ngram + 1):
                    mix = 0
                    for k in range(n):
                        mix ^= wrap64(tok[k] * m[k])
                    for p in primes[layer][n - 2]:
                        feats.append(mix % p)  # mix >= 0 here; Python % is floor-mod like torch.remainder
                row_out.append(feats)
            res.append(row_out)
        out[layer] = res
    return out, primes


CASES = [
    # vocab, table_sizes, max_ngram, heads, layer_ids, pad, seed
    (1, (2,), 2, 1, (0,), 0, 0),
    (7, (5, 11), 3, 2, (1,), 3, 0),
    (1000, (101, 97), 3, 3, (0, 3), 0, 1),
    (129280, (1000, 1000), 3, 8, (1, 15), 2, 0),
    (50_000, (500, 400, 300), 4, 2, (2, 5, 9), 49_999, 12345),
    (2**40 + 3, (64,), 2, 4, (7,), 17, 99),
    (2**61, (31, 37), 3, 2, (0,), 5, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-n{c[2]}-h{c[3]}-L{c[4]}")
def test_hash_matches_plain_loop_reference(case):
    vocab, sizes, n, heads, layers, pad, seed = case
    cfg = HashConfig(vocab, sizes, max_ngram=n, heads=heads, layer_ids=layers, pad_id=pad, seed=seed)
    hasher = NgramHasher(cfg)
    g = torch.Generator().manual_seed(seed + vocab % 1000)
    hi = min(vocab, 2**62)
    ids = torch.randint(0, hi, (3, 11), generator=g, dtype=torch.int64)
    ids[0, :4] = vocab - 1  # the largest id
    ids[1, 2] = pad
    expected, primes = ref_hash(ids.tolist(), vocab, sizes, n, heads, layers, pad, seed)
    got = hasher.hash(ids)
    assert sorted(got) == sorted(layers)
    for layer in layers:
        assert hasher.primes[layer] == primes[layer]
        assert got[layer].dtype == torch.int64
        assert got[layer].shape == (3, 11, (n - 1) * heads)
        assert got[layer].tolist() == expected[layer]


def test_short_and_empty_sequences():
    cfg = HashConfig(100, (50, 60), layer_ids=(0,), pad_id=1, heads=2)
    h = NgramHasher(cfg)
    for T in (0, 1, 2):
        ids = torch.arange(T, dtype=torch.int64).view(1, T) + 10
        exp, _ = ref_hash(ids.tolist(), 100, (50, 60), 3, 2, (0,), 1, 0)
        assert h.hash(ids)[0].tolist() == exp[0]


def test_published_demo_figures():
    cfg = HashConfig(129280, (646400, 646400), max_ngram=3, heads=8, layer_ids=(1, 15), pad_id=2, seed=0)
    h = NgramHasher(cfg)
    assert h.primes[1][0][0] == 646403
    assert sum(h.table_rows.values()) == 20_692_406
    all_primes = [p for L in (1, 15) for order in h.primes[L] for p in order]
    assert len(set(all_primes)) == 32
    assert h.primes == ref_primes((646400, 646400), 8, (1, 15))


def test_offsets_and_row_ids():
    cfg = HashConfig(300, (20, 30), heads=3, layer_ids=(0, 2), pad_id=0, seed=4)
    h = NgramHasher(cfg)
    ids = torch.randint(0, 300, (2, 16))
    local, rows = h.hash(ids), h.row_ids(ids)
    for L in (0, 2):
        flat = [p for order in h.primes[L] for p in order]
        assert h.table_rows[L] == sum(flat)
        assert h.offsets[L].tolist() == [sum(flat[:k]) for k in range(len(flat))]
        assert torch.equal(rows[L], local[L] + h.offsets[L])
        assert (local[L] < torch.tensor(flat)).all()
        assert int(rows[L].max()) < h.table_rows[L]


def test_numpy_input_and_int32_accepted():
    cfg = HashConfig(50, (10, 10), heads=2, layer_ids=(1,), pad_id=0)
    h = NgramHasher(cfg)
    ids = np.random.default_rng(0).integers(0, 50, (2, 5)).astype(np.int32)
    assert torch.equal(h.hash(ids)[1], h.hash(torch.from_numpy(ids).long())[1])


def test_ids_outside_vocabulary_rejected():
    h = NgramHasher(HashConfig(10, (5, 5), heads=1, layer_ids=(0,), pad_id=0))
    with pytest.raises(InvalidRowIdsError, match="outside"):
        h.hash(torch.tensor([[1, 10]]))
    with pytest.raises(InvalidRowIdsError, match="outside"):
        h.row_ids(torch.tensor([[-1, 2]]))
    with pytest.raises(InvalidRowIdsError):
        h.hash(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InvalidRowIdsError, match="shape"):
        h.hash(torch.tensor([1, 2]))


def test_multiplier_overflow_rejected():
    cfg = HashConfig(2**62 + 1, (11, 13), heads=1, layer_ids=(0,), pad_id=0)
    with pytest.raises(EngramStoreError, match="int64"):
        NgramHasher(cfg)


@pytest.mark.parametrize("bad", [
    dict(table_sizes=(11,)),  # one size for two orders
    dict(pad_id=10),
    dict(layer_ids=(1, 1)),
    dict(layer_ids=()),
    dict(max_ngram=1, table_sizes=()),
    dict(table_sizes=(1, 5)),
])
def test_bad_configs(bad):
    base = dict(compressed_vocab_size=10, table_sizes=(11, 13), heads=1, layer_ids=(0,), pad_id=0)
    base.update(bad)
    with pytest.raises(EngramStoreError):
        HashConfig(**base)


def test_config_roundtrip_and_fingerprint():
    cfg = HashConfig(100, (50, 60), layer_ids=(1, 3), pad_id=7, seed=5)
    assert HashConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    lookup = np.arange(120) % 100
    fp = fingerprint(cfg, lookup)
    assert len(fp) == 64 and fp == fingerprint(cfg, lookup.copy())
    assert fp != fingerprint(HashConfig(100, (50, 60), layer_ids=(1, 3), pad_id=7, seed=6), lookup)
    other = lookup.copy()
    other[5] = 6
    assert fp != fingerprint(cfg, other)
    # Stable across processes (no hash randomization, no pointer values).
    code = (
        "import numpy as np; from engram_model.hashing import HashConfig, fingerprint;"
        "print(fingerprint(HashConfig(100, (50, 60), layer_ids=(1, 3), pad_id=7, seed=5), np.arange(120) % 100))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == fp


@pytest.mark.gpu
def test_cuda_matches_cpu():
    cfg = HashConfig(129280, (646400, 646400), heads=8, layer_ids=(1, 15), pad_id=2)
    h = NgramHasher(cfg)
    ids = torch.randint(0, 129280, (4, 512))
    cpu, gpu = h.row_ids(ids), h.row_ids(ids.cuda())
    for L in (1, 15):
        assert gpu[L].device.type == "cuda"
        assert torch.equal(cpu[L], gpu[L].cpu())
