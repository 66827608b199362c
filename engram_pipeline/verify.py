"""Check a store end to end: manifest, remap arrays, file sizes, and every block's checksum.

Used by ``engram-store verify``. The store's own disk backend reads every table with
checksum verification on, through the same "read a range, skipping corrupt blocks" as the
store's warm-up (:meth:`engram_store.disk.blocks.BlockDisk.read_range_valid`): the blocks it
leaves out are the bad ones, each named, not only the first.

It also lists the store's *leftovers*: sibling directories a writer of this path makes
(``.<name>.partial-*``, ``.<name>.old-*``, an import's ``.<name>.<table>.import-*`` scratch) that a
killed writer left behind. They never open as the store and do not make it bad; the next write of
the path removes those whose writer is dead, and each is reported as in use or not.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from engram_store.disk import open_disk
from engram_store.errors import EngramStoreError
from engram_store.format import load_remap, read_manifest, table_info
from engram_store.format.commit import is_locked, leftover_kind

_BLOCKS_PER_READ = 256  # progress granularity; memory is bounded by the disk reader's own chunks
_IO_THREADS = 4


@dataclass
class VerifyReport:
    path: str
    tables: dict[str, dict] = field(default_factory=dict)  # name -> {"blocks": n, "bad": [block, ...]}
    errors: list[str] = field(default_factory=list)  # problems that stop the store from opening
    # sibling directories of writers: {"path", "kind" (partial / old / scratch), "in_use" (a live writer's)}
    leftovers: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(t["bad"] for t in self.tables.values())

    def bad_blocks(self) -> list[tuple[str, int]]:
        return [(n, b) for n, t in self.tables.items() for b in t["bad"]]


def verify_store(path, *, progress: bool = True) -> VerifyReport:
    """Verify the store at ``path``; never raises for corruption, reports it."""
    report = VerifyReport(str(path))
    path = Path(path)
    report.leftovers = find_leftovers(path)
    pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="engram-verify")
    try:
        manifest = read_manifest(path)
        infos = {n: table_info(n, e) for n, e in manifest["tables"].items()}
        for name, info in infos.items():
            load_remap(path, name, manifest["tables"][name], info.rows)
        disk = open_disk(path, manifest, infos, pool, _IO_THREADS, verify_reads=True)
    except EngramStoreError as exc:  # missing/truncated file, bad manifest, bad remap
        pool.shutdown()
        report.errors.append(str(exc))
        return report
    try:
        for name, info in infos.items():
            br = int(manifest["tables"][name]["block_rows"])
            n_blocks = -(-info.rows // br) if info.rows else 0
            good = set()
            for b0 in tqdm(range(0, n_blocks, _BLOCKS_PER_READ), desc=f"verify {name}",
                           unit_scale=_BLOCKS_PER_READ, unit="block", disable=None if progress else True):
                stop = min(info.rows, (b0 + _BLOCKS_PER_READ) * br)
                for s, rows in disk.read_range_valid(name, b0 * br, stop):
                    good.update(range(s // br, -(-(s + rows.shape[0]) // br)))
            bad = [b for b in range(n_blocks) if b not in good]
            report.tables[name] = {"blocks": n_blocks, "block_rows": br, "bad": bad}
    finally:
        pool.shutdown(wait=True)  # no read still running when the disk closes
        disk.close()
    return report


def find_leftovers(path) -> list[dict]:
    """The writer siblings of store path ``path`` (see the module docstring), sorted by name."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    found = [(d, leftover_kind(path, d)) for d in sorted(parent.iterdir())]
    found = [(d, k, is_locked(d)) for d, k in found if k is not None and d.is_dir()]
    writing = any(k == "partial" and locked for _, k, locked in found)  # a scratch dir lives with its partial
    return [{"path": str(d), "kind": k, "in_use": writing if k == "scratch" else locked} for d, k, locked in found]
