"""The crc32 the row files' checksums use (zlib's), as a C function the compiled readers call.

Why not the system zlib: a warm batch's cost is mostly checksums. A miss reads its whole block
(one page) to check it, so a forward with ~4,000 misses checks ~16 MB; zlib 1.2's table-driven
crc32 runs at 1.3-2 GB/s on the 2-core VM (8-12 ms of a 120 ms forward), zlib-ng's folding
crc32 (PCLMULQDQ, picked at run time for the CPU) at 3.5-6.5 GB/s on the same blocks. Same
polynomial, same values: only the speed differs. zlib-ng's native ``zng_crc32`` is taken from
its Python package's extension module; without it (or if it gives a wrong check value) the
system zlib is used.

``crc32(crc, address, length)``: ctypes function, pointers as uint64; ``IMPLEMENTATION`` says which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import zlib

_CHECK = bytes(range(256)) * 17  # not a multiple of any folding width


def _bind(lib: ctypes.CDLL, name: str, length_type):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_uint64, length_type]
    return fn


def _agrees(fn) -> bool:
    buf = ctypes.create_string_buffer(_CHECK, len(_CHECK))
    addr = ctypes.addressof(buf)
    return all(fn(0, addr, n) == zlib.crc32(_CHECK[:n]) for n in (0, 1, 7, 64, 264, 3960, len(_CHECK)))


def _zlib_ng():
    try:
        from zlib_ng import zlib_ng as ext
        fn = _bind(ctypes.CDLL(ext.__file__), "zng_crc32", ctypes.c_uint32)
    except (ImportError, OSError, AttributeError):
        return None
    return fn if _agrees(fn) else None


def _system_zlib():
    return _bind(ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1"), "crc32", ctypes.c_uint)


crc32 = _zlib_ng()
IMPLEMENTATION = "zlib-ng"
if crc32 is None:
    crc32, IMPLEMENTATION = _system_zlib(), "zlib"
