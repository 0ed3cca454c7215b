"""huge_pages: the advice reaches the kernel for the memory the engine's weights live in, and is harmless where
it cannot apply."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from workbench.engine import huge_pages


def _huge_pages_on() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return False


linux_with_thp = pytest.mark.skipif(not _huge_pages_on(), reason="needs Linux with transparent huge pages on")


def _vm_flags_of(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                current = start <= address < end
            elif head == "VmFlags:" and current:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux_with_thp
def test_a_large_empty_tensor_is_advised_before_it_is_filled():
    tensor = huge_pages.empty((3 << 20,), torch.float32)  # 12 MiB: whole 2 MiB pages inside it
    inner = -(-tensor.data_ptr() // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
    assert "hg" in _vm_flags_of(inner)  # the kernel's mark for MADV_HUGEPAGE
    tensor.fill_(1.0)
    assert float(tensor.sum()) == 3 << 20


@linux_with_thp
def test_a_file_mapping_and_an_array_are_advised(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(8 << 20))
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    assert huge_pages.advise(mapping) == 8 << 20
    array = np.memmap(path, dtype=np.uint8, mode="c")
    advised = huge_pages.advise(array)
    assert advised >= 4 << 20 and "hg" in _vm_flags_of(array.ctypes.data + advised // 2)
    del array
    mapping.close()


def test_small_memory_and_other_things_are_left_alone():
    small = huge_pages.empty((100,), torch.int8)  # no whole 2 MiB page inside it
    assert small.shape == (100,) and small.dtype == torch.int8
    assert huge_pages.advise(small) == 0
    if torch.cuda.is_available():  # pragma: no cover - CPU machines
        assert huge_pages.advise(torch.empty(4 << 20, device="cuda")) == 0
    with pytest.raises(TypeError, match="takes a tensor, a numpy array or an mmap"):
        huge_pages.advise([1, 2, 3])
