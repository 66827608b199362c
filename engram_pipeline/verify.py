"""Check a store end to end: manifest, remap arrays, file sizes, and every block's checksum.

Used by ``engram-store verify``. Reads go through the store's own disk backend with
checksum verification on, a few hundred blocks at a time; a range that fails is re-read
block by block so every bad block is named, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from engram_store.errors import EngramStoreError
from engram_store.store import TieredStore

_BLOCKS_PER_READ = 256


@dataclass
class VerifyReport:
    path: str
    tables: dict[str, dict] = field(default_factory=dict)  # name -> {"blocks": n, "bad": [block, ...]}
    errors: list[str] = field(default_factory=list)  # problems that stop the store from opening

    @property
    def ok(self) -> bool:
        return not self.errors and not any(t["bad"] for t in self.tables.values())

    def bad_blocks(self) -> list[tuple[str, int]]:
        return [(n, b) for n, t in self.tables.items() for b in t["bad"]]


def verify_store(path, *, progress: bool = True) -> VerifyReport:
    """Verify the store at ``path``; never raises for corruption, reports it."""
    report = VerifyReport(str(path))
    try:
        store = TieredStore(Path(path), device="cpu")
    except EngramStoreError as exc:  # missing/truncated file, bad manifest, bad remap
        report.errors.append(str(exc))
        return report
    with store:
        for name, info in store.tables.items():
            br = store.block_rows(name)
            n_blocks = -(-info.rows // br) if info.rows else 0
            bad: list[int] = []
            for b0 in tqdm(range(0, n_blocks, _BLOCKS_PER_READ), desc=f"verify {name}", unit_scale=_BLOCKS_PER_READ,
                           unit="block", disable=not progress):
                b1 = min(n_blocks, b0 + _BLOCKS_PER_READ)
                try:
                    store.read_ranks(name, b0 * br, min(info.rows, b1 * br))
                except EngramStoreError:
                    for b in range(b0, b1):
                        try:
                            store.read_ranks(name, b * br, min(info.rows, (b + 1) * br))
                        except EngramStoreError:
                            bad.append(b)
            report.tables[name] = {"blocks": n_blocks, "block_rows": br, "bad": bad}
    return report
