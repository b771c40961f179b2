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
