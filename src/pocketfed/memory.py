"""Peak memory of this process, for budgets and benchmarks (no dependencies: runtime uses it too)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux keeps that high-water mark across execve, so a
    child started by a big parent (a test runner holding Ray and models) would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
