"""Weights on 2 MB pages: the mapped GGUF file and the bandwidth probe.

Decode reads every weight once per token, so the page size the weights sit on is part of the
memory bound. With 4 KB pages each 4 KB of a row costs a TLB miss, and under a hypervisor
(nested paging) a page walk is several memory reads: on a 2-vCPU Xeon VM a plain sum streamed
26 GB/s from 4 KB pages and 36 GB/s from 2 MB pages, and decode ran 4-10% faster with the
weights on 2 MB pages (README, "Weights on 2 MB pages").

Linux maps a file with 2 MB pages (PMD entries) when its page cache holds 2 MB folios, which
it allocates on a page fault in a mapping advised MADV_HUGEPAGE (kernel 6.x, filesystems with
large folios: ext4 since 6.16, xfs, tmpfs). A file already cached in small folios (read by
`cp`, a download, an earlier run without the advice), or whose 2 MB folios memory pressure
has split, stays on 4 KB pages until it leaves the cache, so `map_weights` reads those parts
again: it drops our mapping's pages there, asks the kernel to drop the file's clean cached
pages there (others' mappings keep theirs), and faults them back in. Which parts: those the
kernel reports not mapped by 2 MB entries (PAGEMAP_SCAN, Linux 6.7+), else the whole file
when most of it is on small pages. Later loads find the 2 MB folios in the cache. Where a
re-read does not help (a filesystem or kernel without large folios: the parts left the cache
and came back without one more 2 MB folio), a note in the user cache folder
(`hugepages.json`, per device and kernel) keeps later loads from trying again.

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
RECACHE_BELOW = 0.5              # "on 2 MB pages" from this share on (bound read from 2 MB pages; without
                                 # PAGEMAP_SCAN, the whole file is read again below it)
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
    reread_bytes: int = 0

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
            what = "file" if self.reread_bytes >= self.weight_bytes else f"{self.reread_bytes / 1e6:.0f} MB of it"
            s += f" ({what} re-read into 2 MB page-cache folios in {self.seconds:.1f} s)"
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


# PAGEMAP_SCAN (Linux 6.7+): runs of a mapping's pages by category, here "mapped by a 2 MB entry"
# (linux/fs.h: struct pm_scan_arg, 12 x u64; struct page_region, 3 x u64)
_PAGEMAP_SCAN = 0xC0606610          # _IOWR('f', 16, struct pm_scan_arg)
_PAGE_IS_PRESENT, _PAGE_IS_HUGE = 1 << 3, 1 << 6


def small_page_regions(addr: int, length: int) -> list[tuple[int, int]] | None:
    """The 2 MB-aligned parts (offset, length) of the mapping [addr, addr + length) that are not
    mapped by 2 MB entries (addr 2 MB-aligned), from /proc/self/pagemap's PAGEMAP_SCAN; None
    where the kernel cannot say (before 6.7)."""
    import ctypes
    import fcntl

    class ScanArg(ctypes.Structure):
        _fields_ = [(f, ctypes.c_uint64) for f in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len",
                                                   "max_pages", "category_inverted", "category_mask",
                                                   "category_anyof_mask", "return_mask")]

    class Region(ctypes.Structure):
        _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]

    out: list[tuple[int, int]] = []
    regions = (Region * 256)()
    pos, end = addr, addr + length
    try:
        with open("/proc/self/pagemap", "rb") as f:
            while pos < end:
                arg = ScanArg(size=ctypes.sizeof(ScanArg), start=pos, end=end, vec=ctypes.addressof(regions),
                              vec_len=len(regions), category_inverted=_PAGE_IS_HUGE, category_mask=_PAGE_IS_HUGE,
                              return_mask=_PAGE_IS_HUGE | _PAGE_IS_PRESENT)
                n = fcntl.ioctl(f.fileno(), _PAGEMAP_SCAN, arg)
                for r in regions[:n]:
                    lo = (r.start - addr) // HUGE_PAGE * HUGE_PAGE
                    hi = -(-(r.end - addr) // HUGE_PAGE) * HUGE_PAGE
                    if out and out[-1][0] + out[-1][1] >= lo:
                        lo = out[-1][0]
                        out.pop()
                    out.append((lo, min(hi, length) - lo))
                if arg.walk_end <= pos:
                    break
                pos = arg.walk_end
    except (OSError, ValueError, TypeError):
        return None
    return out


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
    if report.huge_bytes >= span:
        return report
    key = _no_huge_key(path)
    if _reread_failed_before(key):
        return report
    # which 2 MB parts to read again: those on small pages where the kernel says which (after
    # memory pressure split some folios, only those), else the whole file when most of it is
    todo = small_page_regions(addr + start, span) if addr % HUGE_PAGE == 0 else None
    if todo is None:
        todo = [(0, span)] if not report.on_huge_pages else []
    todo_bytes = sum(n for _, n in todo)
    avail = _mem_available()
    if not todo or (avail is not None and todo_bytes > avail // 2):
        return report   # nothing to do, or the cache could not keep a second reading anyway
    t0 = time.perf_counter()
    cached = []
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, n in todo:
                buf.madvise(mmap.MADV_DONTNEED, start + off, n)   # our page-table entries go
                os.posix_fadvise(fd, start + off, n, os.POSIX_FADV_DONTNEED)   # clean, unmapped cached pages
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):
        return report
    for off, n in todo:
        cached.append(cached_share(addr + start + off, n))   # pages another process maps stay cached
        _touch(view[start + off:start + off + n])
    pages = mapping_pages(addr)
    after = PagesReport(span, min(pages[1], span) if pages else report.huge_bytes, reread=True,
                        seconds=time.perf_counter() - t0, reread_bytes=todo_bytes)
    evicted = all(c is not None and c < 0.1 for c in cached)
    if after.huge_bytes <= report.huge_bytes and evicted:
        # the parts left the cache and came back without one more 2 MB folio: this filesystem
        # or kernel does not give them (not a busy moment, nor another process holding the pages)
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
    if huge:
        advise(m)
    a = np.frombuffer(m, dtype=np.float32)
    a[:] = 1.0
    return a
