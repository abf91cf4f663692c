"""Run the eager per-block loss math of a chunk on CPU worker threads.

Why threads and not torch's own intra-op parallelism: the eager math issues ~40
small ops per block, and each op over more than 32k elements opens an OpenMP
parallel region that ends in a barrier. When other processes compete for the
cores, a descheduled OpenMP worker stalls every barrier; on a shared 2-core
machine this made the loss math 5-10x slower than single-threaded. Here each
worker thread runs its blocks with one intra-op thread (no barriers), and the
workers only meet once per chunk. Blocks of a few rows keep each pass in cache.

Block rows are sized so one block of logits holds about EAGER_BLOCK_ELEMENTS values.

Why the allocator is tuned: each block allocates ~10 temporaries of 1 MiB, and
glibc serves allocations that large with mmap, so every one is returned to the
kernel on free and page-faulted back (zeroed) on the next allocation. Measured
here (2-core VM): 9-12 ns per logit for forward KL + CE with the default
allocator, 2.3 ns with the temporaries served from the heap, i.e. page faults
were three quarters of the loss math. `tune_cpu_allocator` raises glibc's mmap
threshold to 32 MiB and its trim threshold to 256 MiB (mallopt) once, on the
first CPU call: freed memory up to that much stays in the process for reuse,
as PyTorch's own CUDA caching allocator does on GPUs. Set ALAMBIC_MALLOC_TUNING=0
to keep the allocator as it is (the loss is then the same, only slower).
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from alambic.losses.fused_kernels import LossSpec, block_loss_and_grad

# 1 MiB of fp32 per block tensor: the ~8 live temporaries of each worker's block
# stay in L3, and blocks are big enough that the workers rarely wait on the GIL
# (every op holds it for a few microseconds). Measured best of 2^15..2^20 here.
EAGER_BLOCK_ELEMENTS = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (process id, workers): a forked child has no pool threads
_pool_lock = threading.Lock()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the largest glibc accepts
TRIM_THRESHOLD_BYTES = 256 * 2**20
_allocator_tuned: bool | None = None  # None: not tried yet


def tune_cpu_allocator() -> bool:
    """Serve large temporaries from the heap instead of mmap (see the module docstring).

    Once per process; glibc only (elsewhere, or with ALAMBIC_MALLOC_TUNING=0, nothing
    changes). Returns whether the allocator is tuned.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if os.environ.get("ALAMBIC_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _allocator_tuned = bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
                )
            except (OSError, AttributeError):
                pass
    return _allocator_tuned


def _one_intra_op_thread() -> None:
    # OpenMP thread counts are per thread, so this leaves the caller's GEMMs parallel.
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _pool_lock:
        if _pool is None or _pool_key != (os.getpid(), workers):
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=True)
            caller_threads = torch.get_num_threads()
            _pool = ThreadPoolExecutor(workers, "alambic-fused-loss", initializer=_one_intra_op_thread)
            _pool_key = (os.getpid(), workers)
            # Start every worker now (the barrier needs them all), then restore the
            # process default that set_num_threads also changed for threads torch meets later.
            barrier = threading.Barrier(workers)
            list(_pool.map(lambda _: barrier.wait(), range(workers)))
            torch.set_num_threads(caller_threads)
        return _pool


def _rows(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:stop]


def _run_blocks(logits, teacher_logits, labels, spec: LossSpec, starts, block_rows):
    kd_sum = logits.new_zeros(())
    ce_sum = logits.new_zeros(())
    with torch.no_grad():  # grad mode is per thread; nothing here needs a graph
        for start in starts:
            stop = start + block_rows
            block = logits[start:stop]
            kd, ce, _ = block_loss_and_grad(
                block, _rows(teacher_logits, start, stop), _rows(labels, start, stop), spec, out=block
            )
            kd_sum += kd
            ce_sum += ce
    return kd_sum, ce_sum


def eager_chunk_loss_and_grad(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum, gradient) of a chunk; the gradient overwrites `logits`."""
    rows = logits.shape[0]
    if logits.device.type != "cpu":
        # On accelerators big kernels win: the whole chunk is one block.
        return _run_blocks(logits, teacher_logits, labels, spec, [0], rows) + (logits,)
    tune_cpu_allocator()
    block_rows = max(1, EAGER_BLOCK_ELEMENTS // logits.shape[1])
    starts = list(range(0, rows, block_rows))
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        return _run_blocks(logits, teacher_logits, labels, spec, starts, block_rows) + (logits,)
    pool = _worker_pool(torch.get_num_threads())
    # Interleaved blocks balance the workers whatever the number of rows.
    futures = [
        pool.submit(_run_blocks, logits, teacher_logits, labels, spec, starts[index::workers], block_rows)
        for index in range(workers)
    ]
    sums = [future.result() for future in futures]
    kd_sum = torch.stack([kd for kd, _ in sums]).sum()
    ce_sum = torch.stack([ce for _, ce in sums]).sum()
    return kd_sum, ce_sum, logits
