"""Weights on 2 MB pages: the mapped GGUF file and the bandwidth probe.

Decode reads every weight once per token, so the page size the weights sit on is part of the
memory bound. With 4 KB pages each 4 KB of a row costs a TLB miss, and under a hypervisor
(nested paging) a page walk is several memory reads: on a 2-vCPU Xeon VM a plain sum streamed
28 GB/s from 4 KB pages and 36 GB/s from 2 MB pages, and the Qwen3.5-4B shape decoded 12%
faster once its file was mapped with 2 MB pages (docs/ARCHITECTURE.md).

Linux maps a file with 2 MB pages (PMD entries) when its page cache holds 2 MB folios, which
it allocates on a page fault in a mapping advised MADV_HUGEPAGE (kernel 6.x, filesystems with
large folios: ext4 since 6.16, xfs, tmpfs). A file already cached in small folios (read by
`cp`, a download, an earlier run without the advice) stays on 4 KB pages until it leaves
the cache, so `map_weights` re-reads it once: drop our mapping's pages, ask the kernel to
drop the file's clean cached pages (others' mappings keep theirs), and fault it back in.
Later loads find the 2 MB folios in the cache and take a fraction of a second. Where the
re-read does not help (a filesystem or kernel without large folios: the file left the cache
and came back without one 2 MB folio), a note in the user cache folder (`hugepages.json`, per
device and kernel) keeps later loads from trying again.

Everything here is advice: on other systems, with THP off ("never") or with
DELTATALK_HUGEPAGES=0 the functions do nothing and weights stay on whatever pages they get.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20
MIN_FILE_BYTES = 16 << 20        # smaller files: their 4 KB page walks cost too little to re-read them
RECACHE_BELOW = 0.5              # re-read when less of the weights than this is on 2 MB pages
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page policy ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def enabled() -> bool:
    """Whether to ask for 2 MB pages: Linux, THP not "never", DELTATALK_HUGEPAGES not 0."""
    if os.environ.get("DELTATALK_HUGEPAGES", "") == "0" or not sys.platform.startswith("linux"):
        return False
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def advise(buf: mmap.mmap) -> bool:
    """MADV_HUGEPAGE on a whole mapping, before its pages are touched; False where not done."""
    if not enabled():
        return False
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return False
    return True


def mapping_pages(addr: int, smaps: str = "/proc/self/smaps") -> tuple[int, int] | None:
    """(resident bytes, bytes mapped by 2 MB entries) of the mapping that holds addr, from
    /proc/self/smaps (Rss and FilePmdMapped + AnonHugePages); None where unreadable."""
    try:
        with open(smaps) as f:
            inside = False
            rss = huge = None
            for line in f:
                head, _, rest = line.partition(" ")
                if "-" in head and not head.endswith(":"):   # a mapping's first line: lo-hi perms ...
                    if inside:
                        break
                    lo, _, hi = head.partition("-")
                    try:
                        inside = int(lo, 16) <= addr < int(hi, 16)
                    except ValueError:
                        inside = False
                elif inside and head in ("Rss:", "FilePmdMapped:", "AnonHugePages:"):
                    kb = int(rest.split()[0]) * 1024
                    if head == "Rss:":
                        rss = kb
                    else:
                        huge = (huge or 0) + kb
    except (OSError, ValueError, IndexError):
        return None
    if rss is None:
        return None
    return rss, huge or 0


def _touch(view: np.ndarray) -> None:
    """Fault in one byte of every 2 MB (the whole file, if its folios are 2 MB)."""
    int(view[::HUGE_PAGE].sum(dtype=np.uint64))


@dataclass
class PagesReport:
    """Where a model's weights ended up: bytes in range, bytes on 2 MB pages, and whether
    (and how long) the file was re-read to get them there."""
    weight_bytes: int
    huge_bytes: int
    reread: bool = False
    seconds: float = 0.0

    @property
    def share(self) -> float:
        return self.huge_bytes / self.weight_bytes if self.weight_bytes else 0.0

    @property
    def on_huge_pages(self) -> bool:
        """Most of the weights on 2 MB pages (then the bandwidth bound is read from 2 MB pages too)."""
        return self.share >= RECACHE_BELOW

    def describe(self) -> str:
        s = f"weights on 2 MB pages: {100 * self.share:.0f}%"
        if self.reread:
            s += f" (file re-read into 2 MB page-cache folios in {self.seconds:.1f} s)"
        return s


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _notes_path() -> Path:
    from engine.kernel_cache import user_cache_root

    return user_cache_root() / "hugepages.json"


def _no_huge_key(path: str) -> str | None:
    """The key of path's filesystem and this kernel in the notes, None where unknown."""
    try:
        return f"{os.stat(path).st_dev}:{os.uname().release}"
    except (OSError, AttributeError):
        return None


def _reread_failed_before(key: str | None) -> bool:
    if key is None:
        return False
    try:
        return key in json.loads(_notes_path().read_text()).get("reread_gives_no_huge_pages", [])
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _note_reread_failed(key: str | None) -> None:
    """Remember (atomically, best effort) that re-reading gave no 2 MB pages on this device and kernel."""
    if key is None:
        return
    p = _notes_path()
    try:
        try:
            notes = json.loads(p.read_text())
            keys = list(notes.get("reread_gives_no_huge_pages", []))
        except (OSError, ValueError, AttributeError, TypeError):
            notes, keys = {}, []
        if not isinstance(notes, dict):
            notes = {}
        notes["reread_gives_no_huge_pages"] = sorted(set(map(str, keys)) | {key})[-64:]
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}")
        tmp.write_text(json.dumps(notes))
        os.replace(tmp, p)
    except OSError:
        pass


def map_weights(buf: mmap.mmap, path: str, data_offset: int) -> PagesReport | None:
    """Put the weights of a mapped file (bytes from data_offset on) on 2 MB pages where the
    system allows (see the module docstring). None when not attempted (disabled, small file)."""
    size = len(buf)
    if not enabled() or size - data_offset < MIN_FILE_BYTES:
        return None
    view = np.frombuffer(buf, dtype=np.uint8)
    start = -(-data_offset // HUGE_PAGE) * HUGE_PAGE           # the first whole 2 MB of weights
    span = (size - start) // HUGE_PAGE * HUGE_PAGE
    if span <= 0:
        return None
    addr = view.ctypes.data
    _touch(view[start:start + span])
    pages = mapping_pages(addr)
    if pages is None:
        return None
    report = PagesReport(span, min(pages[1], span))
    avail = _mem_available()
    if report.share >= RECACHE_BELOW or (avail is not None and size > avail // 2):
        return report   # already there, or the cache could not keep a second reading anyway
    key = _no_huge_key(path)
    if _reread_failed_before(key):
        return report
    t0 = time.perf_counter()
    try:
        buf.madvise(mmap.MADV_DONTNEED)      # our page-table entries go; the file is untouched
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # clean, unmapped cached pages only
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):
        return report
    still_cached = cached_share(addr + start, span)   # pages another process maps stay cached
    _touch(view[start:start + span])
    pages = mapping_pages(addr)
    after = PagesReport(span, min(pages[1], span) if pages else report.huge_bytes, reread=True,
                        seconds=time.perf_counter() - t0)
    if after.huge_bytes == 0 and still_cached is not None and still_cached < 0.1:
        # the file left the cache and came back without one 2 MB folio: this filesystem or
        # kernel does not give them (not a busy moment, nor another process holding the pages)
        _note_reread_failed(key)
    return after


def cached_share(addr: int, length: int) -> float | None:
    """The share of the 4 KB pages of [addr, addr + length) that are in the page cache
    (mincore(2)), None where it cannot be asked."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        n = -(-length // page)
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    return float(np.count_nonzero(np.frombuffer(bytes(vec), dtype=np.uint8) & 1)) / n


def probe_buffer(n_bytes: int, huge: bool) -> np.ndarray:
    """n_bytes of float32 ones for the bandwidth probe, in an anonymous mapping advised onto
    2 MB pages when huge (the probe reads the page size the weights sit on)."""
    # private: an anonymous *shared* mapping is shmem, whose huge pages follow another switch
    m = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    if huge and enabled():
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):
            pass
    a = np.frombuffer(m, dtype=np.float32)
    a[:] = 1.0
    return a
