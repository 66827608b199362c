"""The compiled readers' crc32 (engram_store.disk.crc) gives zlib.crc32's values: the checksums the
writers store with Python's zlib must check, whichever implementation was bound."""

import ctypes
import zlib

import numpy as np
import pytest

from engram_store.disk import crc


@pytest.mark.parametrize("impl", ["bound", "system"])
def test_crc32_equals_zlib_at_every_length_and_offset(impl):
    fn = crc.crc32 if impl == "bound" else crc._system_zlib()
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 70_000, dtype=np.uint8)
    base = data.ctypes.data
    for off in (0, 1, 3, 8, 61):
        for n in (0, 1, 2, 15, 16, 63, 64, 255, 264, 3960, 4096, 4097, 65_536):
            want = zlib.crc32(data[off: off + n].tobytes())
            assert fn(0, base + off, n) == want, (impl, off, n)
    # chained, as zlib's crc32(value, ...) continues a running checksum
    assert fn(fn(0, base, 1000), base + 1000, 3000) == zlib.crc32(data[:4000].tobytes())


def test_a_changed_byte_changes_the_crc():
    buf = bytearray(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    c = (ctypes.c_char * len(buf)).from_buffer(buf)
    before = crc.crc32(0, ctypes.addressof(c), len(buf))
    assert before == zlib.crc32(bytes(buf))
    buf[2049] ^= 0x10
    assert crc.crc32(0, ctypes.addressof(c), len(buf)) != before


def test_zlib_ng_is_bound_when_installed():
    pytest.importorskip("zlib_ng")
    assert crc.IMPLEMENTATION == "zlib-ng"
