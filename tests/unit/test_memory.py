"""pocketfed.memory.release_mapped_file: unmaps clean file pages, never ones the process wrote."""

import mmap
import sys

import pytest

from pocketfed.memory import release_mapped_file

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
