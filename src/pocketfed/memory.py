"""Memory of this process: its peak, for budgets and benchmarks; pages it can hand back; the allocator
(jemalloc for training commands). No dependencies: runtime uses it too."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path
from typing import Callable, Iterator


def _status_mb(field: str) -> float | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in MB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The current resident set of this process, MB (0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux keeps that high-water mark across execve, so a
    child started by a big parent (a test runner holding Ray and models) would report the parent's peak."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_cached_library_pages(package: str) -> None:
    """Evict `package`'s shared libraries from the page cache; call it before the package is imported.

    Why: right after an install the libraries sit in the page cache, and on each page fault the
    kernel also maps the cached pages around the one touched (fault-around). `import torch` then made
    278 MB resident instead of 223 (libtorch_cpu.so: 93 MB instead of 50, mostly code never run),
    and a watch's 512 MB budget moved with what the cache happened to hold. Clean cached pages are
    dropped without loss (posix_fadvise DONTNEED; they are read again on demand, ~0.2 s here), so the
    process's RSS is that of the code it runs. A no-op if the package is already imported or missing.
    """
    import importlib.util
    import os
    import sys
    from pathlib import Path

    if package in sys.modules or not hasattr(os, "posix_fadvise"):
        return
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return
    for path in Path(spec.origin).parent.rglob("*.so*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def release_mapped_file(path: str | Path) -> float:
    """Give back this process's resident pages of read-only-used mappings of `path`; MB released.

    Why: ONNX Runtime maps an external-data file (model.onnx.data) once per initializer. Loading
    reads every initializer to prepack it, and the pages read stay mapped; then each embedding row
    that GatherBlockQuantized reads maps 16 neighbouring cached pages too (fault-around). For an
    onnx-int4 SmolLM2 that was 19 MB resident after load and 25-37 MB after a 1,024-token decode,
    of a 28 MB embedding table of which a text uses a few hundred rows. So, for each mapping of the
    file that holds no page of its own (Anonymous 0: nothing was written, so the file is what it
    holds): madvise(MADV_RANDOM: no read-around) and madvise(MADV_DONTNEED: unmap the pages; a
    later read faults the file's page back in); then drop the file from the page cache, so that
    fault-around finds no neighbours. Measured (bench_runtime, onnx-int4): peak RSS 292 -> 264 MB,
    no speed change. Written by hand because Python's mmap.madvise only reaches mappings Python
    made. Linux only; elsewhere it returns 0.
    """
    import os

    target = str(Path(path).resolve())
    released = _release_mappings(lambda mapped: mapped == target)
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    return released


def release_shared_libraries() -> float:
    """`release_mapped_file`'s madvise for every shared library this process maps (their code and
    read-only data); MB released. What stays resident is what runs next, page by page (no
    read-around), instead of what fault-around mapped from a page cache that other processes keep
    hot: the same process measured 262 MB alone and 318 MB inside a test runner that had run torch."""
    return _release_mappings(lambda mapped: ".so" in Path(mapped).name)


def _mappings() -> Iterator[tuple[int, int, str, str, dict[str, int]]]:
    """This process's mappings from /proc/self/smaps: (start, end, permissions, path or "[heap]" or
    "", {field: kB}) each. Raises OSError where there is no /proc."""
    with open("/proc/self/smaps") as f:
        current: tuple[int, int, str, str, dict[str, int]] | None = None
        for line in f:
            head = line.split(maxsplit=5) or [""]
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                if current is not None:
                    yield current
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (start, end, head[1], head[5].strip() if len(head) == 6 else "", {})
            elif current is not None and len(head) >= 2 and head[0].endswith(":") and head[1].isdigit():
                current[4][head[0][:-1]] = int(head[1])
        if current is not None:
            yield current


def _release_mappings(wanted: Callable[[str], bool]) -> float:
    """madvise(MADV_RANDOM) + madvise(MADV_DONTNEED) on each file mapping whose path is `wanted` and
    that holds no written (Anonymous) page; MB released. Linux only; elsewhere 0."""
    import mmap

    try:
        # [start, end, kB written: Anonymous, the private copies of written pages]
        mappings = [(start, end, fields.get("Anonymous", 0)) for start, end, _, path, fields in _mappings()
                    if path.startswith("/") and wanted(path)]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        advice = (mmap.MADV_RANDOM, mmap.MADV_DONTNEED)  # AttributeError where the platform has none
    except (OSError, AttributeError):
        return 0.0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = rss_mb()
    for start, end, written in mappings:
        for a in advice if not written else ():
            madvise(start, end - start, a)
    return max(0.0, before - rss_mb())


MADV_COLLAPSE = 25  # Linux >= 6.1; Python's mmap module names it only from 3.13


def advise_huge_pages(populated: float = 0.9) -> float:
    """Back this process's resident anonymous memory with transparent huge pages; MB collapsed now.

    Why: ONNX Runtime prepacks the weights into plain malloc'd memory and a decode step reads all of
    it (~100 MB for an onnx-int4 SmolLM2, far beyond the L3), so with 4 kB pages nearly every 4 kB
    of weights costs a TLB miss. Where the kernel's THP mode is `madvise` (Debian's default), malloc
    never asks for huge pages. So, for each private anonymous read-write mapping (and the brk heap):
    madvise(MADV_HUGEPAGE) on its aligned huge-page spans, so that later faults there get huge pages;
    and MADV_COLLAPSE, which rebuilds a span from huge pages now, on the spans of which at least
    `populated` is resident (/proc/self/pagemap's present bit): a sparser span would become resident
    in full, so it is left to its own faults. The kernel merges neighbouring mappings, so a dense
    block of weights can share one mapping with a mostly empty reservation; hence per span, not per
    mapping. Mappings already all in huge pages are skipped, so calling it again costs little.
    Measured on onnx-int4 SmolLM2-135M: see runtime.model. Written by hand because Python's
    mmap.madvise only reaches mappings Python made. Linux only; elsewhere, or where the kernel
    refuses, it does nothing and returns 0.
    """
    import mmap
    import os

    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    try:
        huge = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
        page = os.sysconf("SC_PAGE_SIZE")
        mappings = []  # aligned [start, end) of anonymous mappings not yet all in huge pages
        for start, end, perms, path, fields in _mappings():
            start, end = -(-start // huge) * huge, end // huge * huge
            if perms == "rw-p" and path in ("", "[heap]") and end > start and fields.get("AnonHugePages", 0) * 1024 < end - start:
                mappings.append((start, end))
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, ValueError, AttributeError):
        return 0.0
    if hugepage is None:
        return 0.0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    per_span, need = huge // page, populated * (huge // page)
    collapsed = 0
    with pagemap:
        for start, end in mappings:
            madvise(start, end - start, hugepage)
            pagemap.seek(start // page * 8)
            entries = memoryview(pagemap.read((end - start) // page * 8)).cast("Q")
            dense = [sum(e >> 63 for e in entries[i:i + per_span]) >= need for i in range(0, len(entries), per_span)]
            i = 0
            while i < len(dense):  # one MADV_COLLAPSE per run of dense spans
                j = i
                while j < len(dense) and dense[j]:
                    j += 1
                if j > i and madvise(start + i * huge, (j - i) * huge, MADV_COLLAPSE) == 0:
                    collapsed += (j - i) * huge
                i = j + 1
    return collapsed / 2**20


def release_free_memory() -> None:
    """Hand the pages malloc holds free back to the OS, so that a process holds its live memory only,
    not its last peak (a Ray worker between devices; the simulator after its set-up, whose
    tokenization leaves ~100 MB free in glibc's heap): jemalloc's purge of every arena where it is
    the allocator, else glibc's malloc_trim (elsewhere nothing)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallctl"):  # jemalloc (preloaded): 4096 = MALLCTL_ARENAS_ALL
        libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


REEXEC_MARK = "POCKETFED_MALLOC_REEXEC"  # set in the re-run process: never a second re-exec


def jemalloc_env() -> dict[str, str]:
    """LD_PRELOAD for jemalloc (J. Evans, "A Scalable Concurrent malloc(3) Implementation for
    FreeBSD", BSDCan 2006) where the machine has it (Debian: libjemalloc2), else nothing.

    Why: a training step frees and reallocates hundreds of activation blocks of every size. glibc's
    malloc serves the ~0.6 MB ones from its heap between small long-lived blocks, and cannot hand the
    holes back, so a training process's resident memory grows well past its live peak. Measured on
    SmolLM2-135M, the demo's micro-batch (4 x 64 tokens), 2 threads: a step's peak is 490 MB above
    the process's resting memory under glibc and 300 MB under jemalloc, at the same speed (4 steps in
    8.8-9.0 s under glibc, 8.9-9.4 s under jemalloc). Making glibc mmap those blocks instead costs a
    third of a step's speed (page faults), and capping its arenas changes nothing."""
    lib = ctypes.util.find_library("jemalloc")
    if not lib:
        return {}
    preload = os.environ.get("LD_PRELOAD", "").split()
    return {"LD_PRELOAD": " ".join(preload if lib in preload else [lib, *preload])}


def allocator() -> str:
    """'jemalloc' where it serves this process's malloc (preloaded), else 'libc'."""
    return "jemalloc" if hasattr(ctypes.CDLL(None), "mallctl") else "libc"


def reexec_under_jemalloc() -> None:
    """Run this process again, same command line, with jemalloc preloaded (`jemalloc_env`); return
    without doing anything where it already is, where the machine has no jemalloc, after one re-exec
    already, or where POCKETFED_MALLOC=libc. For commands that train (the simulator): call it first,
    before any thread or file is opened. Whatever the process starts inherits the allocator (Ray's
    processes too)."""
    if os.environ.get("POCKETFED_MALLOC", "") == "libc" or os.environ.get(REEXEC_MARK) or allocator() == "jemalloc":
        return
    env = jemalloc_env()
    if not env:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env, REEXEC_MARK: "1"})

