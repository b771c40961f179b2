"""pocketfed.memory: release_mapped_file unmaps clean file pages, never ones the process wrote;
advise_huge_pages puts resident anonymous memory in huge pages and leaves sparse memory sparse."""

import ctypes
import mmap
import sys
from pathlib import Path

import pytest

from pocketfed.memory import advise_huge_pages, jemalloc_env, release_mapped_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident_kb(path):
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) == 6 and head[5].strip() == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_release_unmaps_clean_pages_and_keeps_the_data(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * (8 * 4096)  # 8 MB
    path.write_bytes(data)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like ONNX Runtime's
    assert sum(m[i] for i in range(0, len(data), 4096)) == 0  # touch every page (byte 0 of each is 0)
    assert _resident_kb(path) >= 7 * 1024
    released = release_mapped_file(path)
    assert released >= 7 and _resident_kb(path) < 1024
    assert m[:] == data  # read back from the file
    m.close()


def test_release_keeps_pages_the_process_wrote(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * (1 << 20))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    m[:5] = b"hello"  # a private copy of page 0: releasing it would lose the write
    release_mapped_file(path)
    assert m[:5] == b"hello"
    m.close()


def test_release_of_a_missing_file_is_a_no_op(tmp_path):
    assert release_mapped_file(tmp_path / "absent.data") == 0.0


def _thp_mode():
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _region_kb(address, field):
    """`field` (Rss, AnonHugePages) of the mapping that holds `address`, kB."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= address < end
            elif inside and head[0] == field + ":":
                return int(head[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel has no transparent huge pages")
def test_huge_pages_back_resident_malloc_memory_and_leave_sparse_memory_sparse():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 32 << 20  # malloc serves it by its own mmap, as ONNX Runtime's prepacked weights; glibc never
    dense, sparse = libc.malloc(size), libc.malloc(8 * size)  # asks for huge pages itself
    try:
        ctypes.memset(dense, 7, size)  # resident, in 4 kB pages (the mode is madvise)
        ctypes.memset(sparse, 7, 4096)  # one page of 256 MB
        middle = dense + size // 2  # madvise splits the mapping at 2 MB boundaries; this part is inside
        sparse_rss = _region_kb(sparse, "Rss")
        assert _region_kb(middle, "AnonHugePages") == 0

        collapsed = advise_huge_pages()

        assert collapsed >= 28  # MB: at least the dense block less its unaligned ends
        assert _region_kb(middle, "AnonHugePages") >= 28 * 1024
        assert ctypes.string_at(dense + size - 1, 1) == b"\x07"  # the data survived the move
        assert _region_kb(sparse, "Rss") < sparse_rss + 4096  # the sparse block was not filled in
        advise_huge_pages()  # again (as each new KV cache does): nothing moves back or fills in
        assert _region_kb(middle, "AnonHugePages") >= 28 * 1024
        assert _region_kb(sparse, "Rss") < sparse_rss + 4096
    finally:
        libc.free(dense)
        libc.free(sparse)


# ---- the allocator: `pocketfed simulate` re-runs itself under jemalloc ----------------------------

REPORT = "import os, sys; from pocketfed.memory import allocator, reexec_under_jemalloc; reexec_under_jemalloc(); " \
         "print(allocator(), os.environ.get('POCKETFED_MALLOC_REEXEC'), sys.argv[1:])"


def _run(env_extra):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "POCKETFED_MALLOC", "POCKETFED_MALLOC_REEXEC")}
    out = subprocess.run([sys.executable, "-c", REPORT, "a b", "--flag"], env={**env, **env_extra},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(maxsplit=2)


@pytest.mark.skipif(not jemalloc_env(), reason="no libjemalloc2 on this machine")
def test_a_process_re_runs_itself_once_under_jemalloc_with_its_arguments():
    assert _run({}) == ["jemalloc", "1", "['a b', '--flag']"]


def test_opting_out_keeps_glibc():
    assert _run({"POCKETFED_MALLOC": "libc"}) == ["libc", "None", "['a b', '--flag']"]


def test_no_second_re_exec_and_none_without_jemalloc(monkeypatch):
    import pocketfed.memory as memory

    def refuse(*args):
        raise AssertionError("re-executed")

    monkeypatch.setattr(memory.os, "execve", refuse)
    monkeypatch.setenv("POCKETFED_MALLOC_REEXEC", "1")  # already re-run once (its preload may have failed)
    memory.reexec_under_jemalloc()
    monkeypatch.delenv("POCKETFED_MALLOC_REEXEC")
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)  # a machine without jemalloc
    assert memory.jemalloc_env() == {}
    if memory.allocator() == "libc":
        memory.reexec_under_jemalloc()


def test_jemalloc_goes_first_in_ld_preload_and_only_once(monkeypatch):
    import pocketfed.memory as memory

    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    assert memory.jemalloc_env() == {"LD_PRELOAD": "libjemalloc.so.2 libother.so"}
    monkeypatch.setenv("LD_PRELOAD", "libother.so libjemalloc.so.2")
    assert memory.jemalloc_env() == {"LD_PRELOAD": "libother.so libjemalloc.so.2"}
