"""Give freed heap memory back to the OS after a session ends (glibc ``malloc_trim``).

Measured with ``benchmarks/soak.py`` (tiny preset, 32x32, CPU): the master's RSS grew by 0.5-3 MiB per
create/delete cycle while the Python objects and tensors it holds stayed constant (``gc`` counts, tensor
bytes); the growth was in anonymous mappings, i.e. memory glibc's allocator keeps in its arenas after a
session's buffers (decode caches, featurizer windows, MP4 encoder) are freed. ``malloc_trim(0)`` after each
cycle brought the RSS back to its level of 40 cycles before. The 30-minute soak then showed a sawtooth
(+2.5 MiB a cycle, an 80 MiB drop every ~45 cycles): an ended session is freed only by a full garbage
collection (it sits in reference cycles), which Python runs rarely. So once a session ended (``request``),
a daemon thread waits ``_DELAY_S`` (until the API and publish threads dropped their last references to the
session), runs a full ``gc.collect()`` and trims, once however many sessions ended meanwhile. Elsewhere
than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_DELAY_S = 1.0


def _glibc_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


class MemoryTrimmer:
    """Trims the heap once, ``delay_s`` after the last ``request`` (one daemon thread, started lazily)."""

    def __init__(self, delay_s: float = _DELAY_S, trim: Callable[[], int] | None = None) -> None:
        self.delay_s = delay_s
        self.trim = trim if trim is not None else _glibc_trim()
        self.trims = 0
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """A session ended: trim soon (no-op where there is nothing to trim)."""
        if self.trim is None:
            return
        self._wanted.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memory-trim", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            # Requests during the delay are served by this one trim.
            threading.Event().wait(self.delay_s)
            self._wanted.clear()
            started = time.perf_counter()
            # An ended session's buffers sit in reference cycles (session, output, playout hooks) until a
            # full collection: without one here its memory came back only every ~45 sessions (the soak's
            # sawtooth), so the trim found nothing to give back.
            gc.collect()
            collected = time.perf_counter() - started
            try:
                released = self.trim()  # type: ignore[misc]
            except Exception:  # never let the trim thread die on a platform quirk
                log.exception("malloc_trim failed")
                return
            self.trims += 1
            log.debug(
                "after a session ended: gc %.0f ms, malloc_trim %s",
                collected * 1e3,
                "released memory" if released else "found nothing",
            )


TRIMMER = MemoryTrimmer()
