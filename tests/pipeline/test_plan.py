"""Tier planning and counts files, checked against straightforward re-computations."""

import numpy as np
import pytest

from engram_pipeline.counts import Counts, merge
from engram_store.errors import EngramStoreError, FingerprintMismatchError, StoreCorruptError, StoreNotFoundError
from engram_pipeline.plan import budget_for_hit_rate, hit_curve, make_plan, overall, plot_plan, zipf_exponent
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


def _reference_global_order(c: Counts, row_bytes: dict[str, int]):
    """Every (table, row) hottest per byte first, ties by table name then row id: a plain sort of all rows."""
    from fractions import Fraction

    names = sorted(c.tables)
    items = sorted((-Fraction(int(v), row_bytes[t]), i, r) for i, t in enumerate(names)
                   for r, v in enumerate(c.tables[t]))
    return [(names[i], r, int(c.tables[names[i]][r]), row_bytes[names[i]]) for _, i, r in items]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_with_many_ties_and_mixed_row_sizes_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    # Counts 0..4 (mostly ties and zeros), one hot row; dims 8 and 16 make c/32 == 2c/64 ties across tables.
    tables = {"layer1": rng.integers(0, 5, 400), "layer2": rng.integers(0, 5, 300) * 2, "layer3": np.zeros(50, int)}
    tables["layer1"][17] = 70000  # above the histogram's dense range
    c = Counts("f" * 64, tables, dims={"layer1": 8, "layer2": 16, "layer3": 8})
    rb = {"layer1": 32, "layer2": 64, "layer3": 32}
    ref = _reference_global_order(c, rb)
    for hbm, dram in [(0, 0), (1000, 3000), (32 * 123 + 5, 64 * 77 + 31), (10**9, 0), (0, 32 * 400 + 64 * 299)]:
        plan = make_plan(c, hbm, dram)
        used, n_hbm = 0, 0
        for _, _, _, b in ref:  # prefix of rows that fit, as a loop
            if used + b > hbm:
                break
            used, n_hbm = used + b, n_hbm + 1
        used, n_all = 0, 0
        for _, _, _, b in ref:
            if used + b > hbm + dram:
                break
            used, n_all = used + b, n_all + 1
        for t, p in plan.items():
            in_hbm = [v for tt, _, v, _ in ref[:n_hbm] if tt == t]
            in_all = [v for tt, _, v, _ in ref[:n_all] if tt == t]
            total = max(int(c.tables[t].sum()), 1)
            assert (p.hbm_rows, p.hbm_rows + p.dram_rows) == (len(in_hbm), len(in_all)), (t, hbm, dram)
            assert p.hbm_hit == pytest.approx(sum(in_hbm) / total)
            assert p.hbm_hit + p.dram_hit == pytest.approx(sum(in_all) / total)
    # budget_for_hit_rate and hit_curve against the same loop.
    grand = sum(v for _, _, v, _ in ref)
    cum_b = np.cumsum([b for *_, b in ref])
    share = np.cumsum([v for _, _, v, _ in ref]) / grand
    for target in (0.01, 0.3, 0.77, 1.0):
        k = next(i for i, s in enumerate(share) if s >= target - 1e-12)
        assert budget_for_hit_rate(c, target) == cum_b[k]
    x, y = hit_curve(c)
    idx = np.unique(np.geomspace(1, len(ref), 200).astype(np.int64) - 1)
    np.testing.assert_array_equal(x, cum_b[idx])
    np.testing.assert_allclose(y, share[idx], rtol=0, atol=1e-15)


def test_plan_in_v41_rows():
    from engram_pipeline.plan import FP8_ROWS

    c = Counts("f" * 64, {"layer1": np.arange(100), "layer14": np.arange(50)}, dims={"layer1": 256, "layer14": 256},
               row_format=FP8_ROWS)
    plan = make_plan(c, 264 * 10, 264 * 5 + 263, FP8_ROWS)
    # 15 whole 264-byte rows fit (not 16, as 256-byte rows would): the 15 hottest are all layer1's.
    assert {n: (p.row_bytes, p.hbm_rows, p.dram_rows) for n, p in plan.items()} == {"layer1": (264, 10, 5),
                                                                                     "layer14": (264, 0, 0)}
    with pytest.raises(EngramStoreError, match="fp8_e4m3_ue8m0"):
        make_plan(c, 0, 0, "int3")
