"""engine.hugepages: the weights' mapping on 2 MB pages, the probe on the same page size, and
everything that must not change on the way (the bytes, the behaviour where the system says no)."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

import numpy as np
import pytest

from engine import hugepages

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or hugepages.thp_mode() not in ("always", "madvise"),
                               reason="needs Linux with transparent huge pages enabled")


def test_thp_mode_reads_the_bracketed_policy(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(p)) == "madvise"
    p.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(p)) == "always"
    p.write_text("garbled\n")
    assert hugepages.thp_mode(str(p)) is None
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DELTATALK_HUGEPAGES", "0")
    assert not hugepages.enabled()
    buf = mmap.mmap(-1, 1 << 20)
    assert hugepages.advise(buf) is False
    assert hugepages.map_weights(buf, "/nonexistent", 0) is None


SMAPS = """\
7f0000000000-7f0000400000 r--s 00000000 fd:01 123 /models/a.gguf
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
AnonHugePages:         0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
FilePmdMapped:         0 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac
"""


def test_mapping_pages_reads_the_mapping_that_holds_the_address(tmp_path):
    p = tmp_path / "smaps"
    p.write_text(SMAPS)
    assert hugepages.mapping_pages(0x7F0000001000, str(p)) == (4096 << 10, 2048 << 10)
    assert hugepages.mapping_pages(0x7F0000400000, str(p)) == (2048 << 10, 2048 << 10)
    assert hugepages.mapping_pages(0x1000, str(p)) is None          # in no mapping
    assert hugepages.mapping_pages(0x1000, str(tmp_path / "no")) is None


def test_report_share_and_text():
    r = hugepages.PagesReport(100 << 20, 98 << 20, reread=True, seconds=0.84, reread_bytes=100 << 20)
    assert r.on_huge_pages and abs(r.share - 0.98) < 1e-9
    assert r.describe() == "weights on 2 MB pages: 98% (file re-read into 2 MB page-cache folios in 0.8 s)"
    part = hugepages.PagesReport(100 << 20, 100 << 20, reread=True, seconds=0.04, reread_bytes=6 << 20)
    assert part.describe() == "weights on 2 MB pages: 100% (6 MB of it re-read into 2 MB page-cache folios in 0.0 s)"
    assert not hugepages.PagesReport(100 << 20, 10 << 20).on_huge_pages
    assert hugepages.PagesReport(0, 0).share == 0.0


@pytest.mark.parametrize("huge", [False, True])
def test_probe_buffer_is_ones_on_the_asked_pages(huge):
    n = 8 << 20
    a = hugepages.probe_buffer(n, huge)
    assert a.dtype == np.float32 and a.nbytes == n and bool(np.all(a == 1.0))
    pages = hugepages.mapping_pages(a.ctypes.data) if sys.platform.startswith("linux") else None
    if pages is None:
        return
    if not huge or not hugepages.enabled():
        assert pages[1] == 0
    # (huge=True may still get 4 KB pages when memory is fragmented: asserted below where THP is on)


@linux_thp
def test_probe_buffer_gets_huge_pages_where_enabled():
    a = hugepages.probe_buffer(16 << 20, True)
    assert hugepages.mapping_pages(a.ctypes.data)[1] >= 2 << 20


def _in_small_folios(path, offset=0, length=None):
    """Drop (a part of) the file from the page cache, then read it back 4 KB at a time without
    readahead: the page cache then holds it in 4 KB folios, as after an ordinary read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if length is None else offset + length
        os.posix_fadvise(fd, offset, end - offset, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in range(offset, end, 4096):
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)


@linux_thp
def test_map_weights_rereads_a_file_cached_in_small_folios(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATALK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, size=24 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())   # clean pages: the kernel drops only those
    _in_small_folios(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert hugepages.advise(buf)
    report = hugepages.map_weights(buf, str(path), 4096)
    assert report is not None and report.weight_bytes == (24 << 20) - (2 << 20)   # whole 2 MB past the header
    # the bytes are the file's, whatever happened to the page cache under them
    assert hashlib.sha256(buf[:]).digest() == hashlib.sha256(data).digest()
    notes = tmp_path / "cache" / "hugepages.json"
    if report.on_huge_pages:
        assert notes.exists() is False
        again = hugepages.map_weights(buf, str(path), 4096)     # at most the odd part left to mend
        assert again is not None and again.share >= report.share and again.reread_bytes <= 4 << 20
    else:   # a filesystem without large folios: tried once, noted, never again
        assert report.reread
        if report.huge_bytes == 0:
            assert notes.exists()
            again = hugepages.map_weights(buf, str(path), 4096)
            assert again is not None and not again.reread
    buf.close()


def _small_folio_file(tmp_path, n=24 << 20):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(1).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    _in_small_folios(path)
    return path, data


@linux_thp
def test_pages_another_mapping_holds_are_not_taken_for_a_filesystem_without_huge_pages(tmp_path, monkeypatch):
    """Another process (here: another mapping) keeps the small folios cached: the re-read cannot
    replace them, and that must not be noted as "this filesystem gives no 2 MB pages"."""
    monkeypatch.setenv("DELTATALK_CACHE_DIR", str(tmp_path / "cache"))
    path, data = _small_folio_file(tmp_path)
    with open(path, "rb") as f:
        holder = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    held = np.frombuffer(holder, dtype=np.uint8)
    int(held[::4096].sum(dtype=np.uint64))              # every page mapped by the holder
    assert hugepages.advise(buf)
    report = hugepages.map_weights(buf, str(path), 0)
    assert report is not None and report.reread and not report.on_huge_pages
    assert not (tmp_path / "cache" / "hugepages.json").exists()
    assert bytes(buf[:]) == data
    del held
    holder.close()
    buf.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise: Linux")
def test_cached_share_follows_the_page_cache(tmp_path):
    path, _ = _small_folio_file(tmp_path, 4 << 20)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert hugepages.cached_share(addr, 4 << 20) > 0.9      # just read
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert hugepages.cached_share(addr, 4 << 20) < 0.1      # dropped (nothing maps it)
    buf.close()


@linux_thp
def test_only_the_parts_on_small_pages_are_read_again(tmp_path, monkeypatch):
    """Memory pressure splits some of a file's 2 MB folios: the next load re-reads just those."""
    monkeypatch.setenv("DELTATALK_CACHE_DIR", str(tmp_path / "cache"))
    path, data = _small_folio_file(tmp_path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    hugepages.advise(buf)
    first = hugepages.map_weights(buf, str(path), 0)
    buf.close()
    if first is None or first.huge_bytes < first.weight_bytes:
        pytest.skip("this kernel or filesystem does not cache the file in 2 MB folios")
    if hugepages.small_page_regions(np.frombuffer(hugepages.probe_buffer(4 << 20, False), np.uint8).ctypes.data,
                                    2 << 20) is None:
        pytest.skip("no PAGEMAP_SCAN (Linux < 6.7): the whole file would be read again instead")
    _in_small_folios(path, 6 << 20, 2 << 20)           # one 2 MB part now cached in 4 KB folios
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    hugepages.advise(buf)
    report = hugepages.map_weights(buf, str(path), 0)
    assert report is not None and report.reread and report.reread_bytes == 2 << 20
    assert report.huge_bytes == report.weight_bytes
    assert "2 MB of it re-read" in report.describe()
    assert bytes(buf[:]) == data
    buf.close()


@linux_thp
def test_small_page_regions_lists_what_is_not_on_2mb_pages():
    n = 8 << 20
    a = np.frombuffer(hugepages.probe_buffer(n + (2 << 20), False), np.uint8)   # 4 KB pages (no advice)
    base = -(-a.ctypes.data // (2 << 20)) * (2 << 20) - a.ctypes.data          # a 2 MB boundary inside
    regions = hugepages.small_page_regions(a.ctypes.data + base, n)
    if regions is None:
        pytest.skip("no PAGEMAP_SCAN (Linux < 6.7)")
    assert regions == [(0, n)]                                                  # one run, all of it
    b = hugepages.probe_buffer(n + (2 << 20), True)                             # 2 MB pages where it can
    bb = np.frombuffer(b, np.uint8)
    base = -(-bb.ctypes.data // (2 << 20)) * (2 << 20) - bb.ctypes.data
    regions = hugepages.small_page_regions(bb.ctypes.data + base, n)
    huge = hugepages.mapping_pages(bb.ctypes.data)[1]
    assert sum(length for _, length in regions) <= n - min(huge, n) + (2 << 20)
    assert all(off % (2 << 20) == 0 and length % (2 << 20) == 0 for off, length in regions)


def test_small_files_are_left_alone(tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(hugepages.MIN_FILE_BYTES - 1))
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert hugepages.map_weights(buf, str(path), 0) is None
    buf.close()


def test_a_failed_reread_is_remembered_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATALK_CACHE_DIR", str(tmp_path))
    key = hugepages._no_huge_key(str(tmp_path))
    assert key is not None and not hugepages._reread_failed_before(key)
    hugepages._note_reread_failed(key)
    hugepages._note_reread_failed(key)
    assert hugepages._reread_failed_before(key)
    assert not hugepages._reread_failed_before(key + "x")
    (tmp_path / "hugepages.json").write_text("{not json")        # a damaged note: ignored, then rewritten
    assert not hugepages._reread_failed_before(key)
    hugepages._note_reread_failed(key)
    assert hugepages._reread_failed_before(key)


@linux_thp
def test_loading_a_model_maps_its_weights_and_reports_where(default_model_path):
    from engine.loader import load_model

    loaded = load_model(default_model_path)
    try:
        pages = loaded.gguf.pages
        assert pages is not None and pages.weight_bytes > 0.9 * (loaded.file_size - loaded.gguf.data_offset) - (4 << 20)
        assert pages.describe().startswith("weights on 2 MB pages: ")
    finally:
        loaded.gguf.close()
