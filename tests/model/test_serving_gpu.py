"""The CUDA serving path against the CPU path (skipped without a CUDA device).

    python3 -m pytest -m gpu tests/test_serving_gpu.py -s

The store on CUDA stages host rows in pinned buffers and copies them on a side stream; the
model waits on the copy's event at the Engram layer. Checks: the rows arrive bit-exact from
every tier, the CUDA-served logits equal the CUDA in-memory model's bit for bit (same kernels,
same inputs), and are close to the CPU model's (different kernels: ``assert_close`` reports
max / mean difference); decoding on CUDA equals the full forward.

``ENGRAM_GPU_TEST_DEVICE=cpu python3 -m pytest --noconftest -m gpu tests/test_serving_gpu.py``
runs the same tests on the CPU (a dry run of the logic where no GPU is lent).
"""

from __future__ import annotations

import os

import pytest
import torch

import engram_store
from engram_model.generate import generate, prefill, step
from engram_model.serving import load_served
from engram_store.format import DTYPES
from test_serving import batches, budgets, build_store, reference, table_bytes, tiny_checkpoint

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("ENGRAM_GPU_TEST_DEVICE", "cuda")


def assert_close_report(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4):
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    diff = (got - want).abs()
    report = f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"
    print(report)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{report}\n{m}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-gpu")
    _, ckpt = tiny_checkpoint(root / "ckpt")
    stores = {(b, d): build_store(ckpt, root / f"store-{b}-{d}", b, d)
              for b in ("mmap", "lmdb") for d in ("float32", "bfloat16")}
    return root, ckpt, stores


def on_device(ckpt_dir, dtype: str = "float32"):
    model = reference(ckpt_dir, dtype)
    return model.to(DEVICE)


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("budget", ["all-hbm", "all-dram", "all-disk", "mixed"])
def test_cuda_rows_bit_exact_every_tier(world, backend, budget):
    root, ckpt, stores = world
    hbm, dram = budgets(table_bytes(ckpt))[budget]
    tables = ckpt.engram_tables()
    with engram_store.open(stores[backend, "float32"], device=DEVICE, hbm_bytes=hbm, dram_bytes=dram) as store:
        if DEVICE == "cuda":
            assert store._side_stream is not None and store._side_stream != torch.cuda.current_stream()
            for t in store._t.values():
                assert t.dram.capacity == 0 or t.dram.slab.is_pinned()
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            for name, table in tables.items():
                ids = torch.randint(0, table.shape[0], (3, 24, 4), generator=g)
                rows = store.prefetch(name, ids).wait()
                assert rows.device.type == torch.device(DEVICE).type
                assert torch.equal(rows.cpu(), table[ids]), f"{backend}/{budget}/{name}"


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_served_logits(world, backend, dtype):
    root, ckpt, stores = world
    total = table_bytes(ckpt, dtype)
    ref_dev, ref_cpu = on_device(root / "ckpt", dtype), reference(root / "ckpt", dtype)
    for budget, (hbm, dram) in budgets(total).items():
        model, store = load_served(root / "ckpt", stores[backend, dtype], device=DEVICE, hbm_bytes=hbm,
                                   dram_bytes=dram)
        with store, torch.no_grad():
            for x in batches(model.config.vocab_size, n=3):
                got = model(x.to(DEVICE))
                want = ref_dev(x.to(DEVICE))
                assert_close_report(got, want, f"{backend}/{dtype}/{budget} served vs in-memory on {DEVICE}",
                                    atol=0, rtol=0)
                assert_close_report(got, ref_cpu(x), f"{backend}/{dtype}/{budget} {DEVICE} vs cpu")
            timer = model.serving_timer.summary()
            assert timer["prefetches"] == timer["waits"] == 6


def test_cuda_decode_equals_full_forward(world):
    root, ckpt, stores = world
    total = table_bytes(ckpt)
    model, store = load_served(root / "ckpt", stores["mmap", "float32"], device=DEVICE,
                               hbm_bytes=total // 10, dram_bytes=total // 8)
    with store:
        for x in batches(model.config.vocab_size, n=2, T=model.config.max_seq_len, seed=4):
            x = x.to(DEVICE)
            with torch.no_grad():
                want = model(x)
            state, first = prefill(model, x[:, :3])
            got = torch.cat([first] + [step(model, state, x[:, t:t + 1]) for t in range(3, x.shape[1])], dim=1)
            assert got.device.type == torch.device(DEVICE).type
            assert_close_report(got, want, f"decode vs full forward on {DEVICE}", atol=1e-4, rtol=1e-4)
        out = generate(model, x[:, :4], max_new_tokens=8)
        assert out.shape == (x.shape[0], 12)
        seq = x[:, :4]
        with torch.no_grad():
            for _ in range(8):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq.cpu())


def test_cuda_half_rows_cast_at_use(world):
    """A bfloat16 store on CUDA gives bfloat16 rows; the model casts them to its dtype at the layer."""
    root, ckpt, stores = world
    with engram_store.open(stores["lmdb", "bfloat16"], device=DEVICE, dram_bytes=1 << 20) as store:
        ids = torch.arange(40).reshape(2, 5, 4)
        rows = store.lookup("layer0", ids)
        assert rows.dtype == torch.bfloat16
        assert torch.equal(rows.cpu(), ckpt.engram_tables()["layer0"].to(DTYPES["bfloat16"])[ids])
