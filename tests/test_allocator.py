"""cpu_malloc_mmap_threshold: glibc's mmap threshold fixed from inside the process (allocator.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from allocator import glibc, set_malloc_mmap_threshold
from config_schema import validate_config
from helpers import compose_config

REPO = Path(__file__).resolve().parents[1]

# In a fresh process: free a 4 MiB malloc block (glibc's dynamic threshold then rises to 4 MiB), then malloc 2 MiB and
# print whether it was mapped on its own (mallinfo2's hblkhd, bytes in mmapped blocks, grew) or came from the heap.
PROBE = '''
import ctypes, sys
sys.path.insert(0, {repo!r})
from allocator import glibc, set_malloc_mmap_threshold
libc = glibc()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
assert set_malloc_mmap_threshold({threshold}) is None
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblkhd - before >= 2 << 20)
'''


def mapped_after_a_free(threshold) -> bool:
    out = subprocess.run([sys.executable, '-c', PROBE.format(repo=str(REPO), threshold=threshold)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip() == 'True'


@pytest.mark.skipif(glibc() is None or not hasattr(glibc(), 'mallinfo2'), reason='needs glibc ≥ 2.33')
def test_a_fixed_threshold_maps_blocks_that_the_dynamic_one_puts_on_the_heap():
    """glibc's default: freeing the 4 MiB mapped block raises the threshold to 4 MiB, so the next 2 MiB block comes
    from the heap. With the threshold fixed at 128 KiB (mallopt disables the dynamic adjustment) it is mapped."""
    assert not mapped_after_a_free(None)
    assert mapped_after_a_free(131072)


def test_the_threshold_is_validated_and_null_leaves_malloc_alone(tmp_path):
    """mallopt(3) gives 32 MiB as M_MMAP_THRESHOLD's maximum on 64-bit systems; null sets nothing."""
    config = compose_config(['cpu_malloc_mmap_threshold=67108864'], tmp_path)
    assert validate_config(config) == ['cpu_malloc_mmap_threshold=67108864 must be an integer of bytes from 0 to '
                                       "33554432 (32 MiB), or null (glibc's dynamic threshold)"]
    assert validate_config(compose_config(['cpu_malloc_mmap_threshold=null'], tmp_path)) == []
    assert set_malloc_mmap_threshold(None) is None
