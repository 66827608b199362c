"""Splitting the HBM / DRAM byte budgets among tables, and checking them against the machine.

``tier_plan`` (from the manifest, or passed to ``open``) may give each table its share:
``{"tables": {name: {"hbm_fraction": f, "dram_fraction": f}}}`` (fractions of the budgets;
a table the plan does not name shares what is left, proportionally to its bytes). Without a
plan every table gets a share proportional to its size. A table's HBM tier is
``min(rows, share // row_bytes)`` ranks, its DRAM tier ``min(rows - H, share // row_bytes)``
slots; a budget larger than the tables is clamped, never an error. What is actually
allocated must fit what psutil (and, on CUDA, ``torch.cuda.mem_get_info``) says is
available, else :class:`BudgetError` — before anything is allocated. The device itself is checked
first (:func:`resolve_device`): a device the machine lacks is a :class:`DeviceError`, not torch's
bare assertion from deep inside the first allocation.
"""

from __future__ import annotations

import psutil
import torch

from engram_store.errors import BudgetError, DeviceError
from engram_store.format import TableInfo


def resolve_device(device) -> torch.device:
    """The store's device: None -> ``cuda`` (its current index) when CUDA is usable, else ``cpu``.

    A store serves on ``cpu`` or ``cuda[:N]``. Anything else, ``cuda`` on a torch build or machine
    without CUDA, and ``cuda:N`` past the device count raise :class:`DeviceError` naming the device and
    what to do; nothing is opened or allocated before this check.
    """
    if device is None:
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0' (or a torch.device), got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise DeviceError(f"device {device!r} is not a device string torch understands ({e}); "
                          "use device='cpu' or device='cuda[:N]'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {str(dev)!r}: a store serves on 'cpu' or 'cuda[:N]'; use device='cpu' "
                          "(or a CUDA GPU with device='cuda')")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
        raise DeviceError(f"device {str(dev)!r} was asked for, but {why}: use device='cpu', or install a CUDA "
                          "build of torch on a machine with an NVIDIA GPU")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise DeviceError(f"device {str(dev)!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                          "pick one of them, or use device='cpu'")
    return torch.device("cuda", index)


def _shares(infos: dict[str, TableInfo], total: int, fractions: dict[str, float]) -> dict[str, int]:
    out = {n: int(total * float(fractions[n])) for n in infos if n in fractions}
    rest = [n for n in infos if n not in fractions]
    left = max(0, total - sum(out.values()))
    weight = sum(infos[n].nbytes for n in rest)
    for n in rest:
        out[n] = int(left * infos[n].nbytes // weight) if weight else 0
    return out


def plan_rows(infos: dict[str, TableInfo], hbm_bytes: int, dram_bytes: int,
              tier_plan: dict | None = None) -> dict[str, tuple[int, int]]:
    """{table: (hbm_rows H, dram_slots C)} for the given budgets."""
    for label, v in (("hbm_bytes", hbm_bytes), ("dram_bytes", dram_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BudgetError(f"{label} must be a non-negative int of bytes, got {v!r} (tools.sizes.parse_size helps)")
    plan_tables = (tier_plan or {}).get("tables", {}) if isinstance(tier_plan, dict) else {}
    hf = {n: p["hbm_fraction"] for n, p in plan_tables.items() if n in infos and "hbm_fraction" in p}
    df = {n: p["dram_fraction"] for n, p in plan_tables.items() if n in infos and "dram_fraction" in p}
    if sum(hf.values()) > 1.0 + 1e-9 or sum(df.values()) > 1.0 + 1e-9:
        raise BudgetError("tier_plan fractions add up to more than 1; fix the plan (engram-store plan)")
    hs, ds = _shares(infos, hbm_bytes, hf), _shares(infos, dram_bytes, df)
    out = {}
    for n, info in infos.items():
        h = min(info.rows, hs[n] // info.row_bytes)
        c = min(info.rows - h, ds[n] // info.row_bytes)
        out[n] = (int(h), int(c))
    return out


def check_budget(infos: dict[str, TableInfo], rows: dict[str, tuple[int, int]], device: torch.device) -> None:
    """Raise BudgetError if the tiers (plus per-row metadata) do not fit the machine."""
    hbm = sum(rows[n][0] * infos[n].row_bytes for n in infos)
    dram = sum(rows[n][1] * (infos[n].row_bytes + 28) for n in infos)  # slab + policy/ready arrays
    meta = sum(info.rows * 16 for info in infos.values())  # remap + policy key map (+ dedupe)
    host = dram + meta + (hbm if device.type == "cpu" else 0)
    avail = psutil.virtual_memory().available
    if host > avail:
        raise BudgetError(
            f"the store needs {host / 2**20:.1f} MiB of RAM (DRAM tier {dram / 2**20:.1f} MiB"
            f"{', HBM tier on cpu %.1f MiB' % (hbm / 2**20) if device.type == 'cpu' else ''}, metadata "
            f"{meta / 2**20:.1f} MiB) but only {avail / 2**20:.1f} MiB is available: lower dram_bytes/hbm_bytes"
        )
    if device.type == "cuda" and hbm:
        free, _ = torch.cuda.mem_get_info(device)
        if hbm > free:
            raise BudgetError(
                f"hbm_bytes needs {hbm / 2**20:.1f} MiB on {device} but only {free / 2**20:.1f} MiB is free: "
                "lower hbm_bytes"
            )
