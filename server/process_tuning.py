"""Settings for a long-lived analysis process that handles one large study after another.

Measured on a 300-slice study (benchmarks/README.md), each of these took 0.1-0.5 s per study:

* glibc hands blocks of hundreds of MB back to the kernel when they are freed (mmap/munmap),
  so every study faults its volume and intermediate arrays in again, page by page. Raising
  glibc's mmap and trim thresholds keeps freed memory in the process for the next study: the
  process's resident size stays at its peak between studies instead of dropping back.
* A study makes tens of thousands of pydicom objects, which trigger full garbage
  collections; each one scanned every object made at start-up (torch, MONAI, the ONNX
  Runtime session). ``gc.freeze`` moves those out of the collector's way; they are never
  garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
RETAINED_BLOCK_BYTES = 2**31 - 1  # blocks up to 2 GiB come from (and go back to) the heap


def tune_analysis_process() -> None:
    """Call once, after start-up (models loaded): later allocations and collections benefit."""
    gc.freeze()
    if not _retain_freed_memory():
        log.info("not glibc: freed memory goes back to the system after each study")


def _retain_freed_memory() -> bool:
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, RETAINED_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED_BLOCK_BYTES))
