"""Tier planning and counts files, checked against straightforward re-computations."""

import numpy as np
import pytest

from engram_pipeline.counts import Counts, merge
from engram_store.errors import EngramStoreError, FingerprintMismatchError, StoreCorruptError, StoreNotFoundError
from engram_pipeline.plan import budget_for_hit_rate, make_plan, overall, plot_plan, zipf_exponent
from tools.sizes import parse_size


def _counts(seed=0, rows=(500, 300), fp="f" * 64):
    rng = np.random.default_rng(seed)
    tables = {f"layer{i}": rng.zipf(1.3, size=n).astype(np.int64) % 1000 for i, n in enumerate(rows)}
    return Counts(fp, tables, {"seed": 0}, {n: 8 for n in tables}, tokens=1234, files=3)


def test_plan_matches_brute_force_global_top_rows():
    c = _counts()
    row_bytes = 8 * 4
    hbm, dram = 37 * row_bytes + 5, 120 * row_bytes  # partial rows do not fit
    plan = make_plan(c, hbm, dram)
    # Reference: list every (count, table, row) and take the top ones, ties by table then row.
    items = sorted(((-int(v), t, r) for t in sorted(c.tables) for r, v in enumerate(c.tables[t])))
    top_hbm, top_all = items[:37], items[:37 + 120]
    for t, p in plan.items():
        assert p.hbm_rows == sum(1 for _, tt, _ in top_hbm if tt == t)
        assert p.hbm_rows + p.dram_rows == sum(1 for _, tt, _ in top_all if tt == t)
        total = c.tables[t].sum()
        assert p.hbm_hit == pytest.approx(sum(-v for v, tt, _ in top_hbm if tt == t) / total)
        cached = sum(-v for v, tt, _ in top_all if tt == t) / total
        assert p.hbm_hit + p.dram_hit == pytest.approx(cached)
        assert p.disk_hit == pytest.approx(1 - cached)
    o = overall(plan, c)
    grand = sum(v.sum() for v in c.tables.values())
    assert o["hbm"] == pytest.approx(sum(-v for v, _, _ in top_hbm) / grand)


def test_zero_and_huge_budgets():
    c = _counts()
    assert all(p.hbm_rows == 0 and p.dram_rows == 0 for p in make_plan(c, 0, 0).values())
    full = make_plan(c, 0, 10**12)
    assert all(p.dram_rows == p.rows and p.disk_hit == pytest.approx(0) for p in full.values())


def test_zipf_exponent_recovers_the_exponent_of_exact_zipf_counts():
    ranks = np.arange(1, 20001)
    for s in (0.8, 1.0, 1.2):
        counts = np.floor(1e9 * ranks ** -s).astype(np.int64)
        np.random.default_rng(1).shuffle(counts)
        assert zipf_exponent(counts) == pytest.approx(s, abs=0.01)


def test_budget_for_target_is_the_smallest_that_reaches_it():
    c = _counts(3)
    for target in (0.3, 0.5, 0.9, 1.0):
        b = budget_for_hit_rate(c, target)
        assert overall(make_plan(c, 0, b), c)["dram"] >= target - 1e-9
        assert overall(make_plan(c, 0, b - 32), c)["dram"] < target
    with pytest.raises(EngramStoreError, match="target hit rate"):
        budget_for_hit_rate(c, 1.5)


def test_counts_save_load_merge_roundtrip(tmp_path):
    a, b = _counts(1), _counts(2)
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    m = merge([Counts.load(tmp_path / "a.npz"), Counts.load(tmp_path / "b.npz")])
    for t in a.tables:
        np.testing.assert_array_equal(m.tables[t], a.tables[t] + b.tables[t])
    assert m.tokens == a.tokens + b.tokens and m.fingerprint == a.fingerprint
    assert not list(tmp_path.glob("*.partial"))


def test_counts_bad_input(tmp_path):
    with pytest.raises(StoreNotFoundError, match="engram-store count"):
        Counts.load(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(StoreCorruptError):
        Counts.load(tmp_path / "bad.npz")
    with pytest.raises(FingerprintMismatchError, match="count the corpus again"):
        merge([_counts(fp="a" * 64), _counts(fp="b" * 64)])
    with pytest.raises(FingerprintMismatchError):
        merge([_counts(rows=(10, 20)), _counts(rows=(10, 21))])


def test_plot_is_written(tmp_path):
    c = _counts()
    plot_plan(c, make_plan(c, 1024, 4096), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text,value", [("0", 0), ("512", 512), ("1KiB", 1024), ("1.5MB", 1_500_000),
                                         ("2gib", 2 * 2**30), (" 3 GB ", 3 * 10**9)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1 parsecs", "MiB", "-1GB", "1e3", ""])
def test_parse_size_rejects_unknown_units(text):
    with pytest.raises(EngramStoreError, match="KiB, MiB"):
        parse_size(text)
