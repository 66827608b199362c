"""Parse human byte sizes (``512MiB``, ``1.5GB``, ``0``) for the CLI's budget flags."""

from __future__ import annotations

import re

from engram_store.errors import EngramStoreError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """``"1GiB"`` → 1073741824. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise EngramStoreError(
            f"cannot read size {text!r}: write a number with an optional unit "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 512MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])
