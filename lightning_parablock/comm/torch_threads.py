"""One torch thread for the communication thread, so that its work cannot slow the training thread's.

With torch's OpenMP backend (libgomp on Linux) every thread that runs a parallel torch op gets a team of
helper threads of its own. Once the communication thread has one beside the training thread's, libgomp
manages more threads than there are cores and switches every team, the training thread's included, from
spinning to sleeping between parallel regions (its "throttled" spin count): each of the thousands of
regions in a training step then waits for a futex wake-up, for the rest of the fit. A thread that runs
torch ops with one thread creates no team. An exchange is copies and sums of a few blocks, memory-bound
work that one thread does about as fast as several and that hides behind a round of compute anyway.
"""

from __future__ import annotations

import functools
import threading

import torch


def use_one_torch_thread() -> None:
    """Run this thread's torch ops on this thread alone; other threads keep the count they had or would get."""
    if not _per_thread_intra_op_pools():
        return
    inherited = torch.get_num_threads()
    if inherited == 1:
        return
    torch.set_num_threads(1)  # this thread's OpenMP and MKL settings
    # ATen also keeps the count process-wide, for threads that run their first torch op later: give them back
    # what they inherited, from a thread that ends at once (the call sets its caller's count too).
    restore = threading.Thread(target=torch.set_num_threads, args=(inherited,), name="parablock-torch-threads")
    restore.start()
    restore.join()


@functools.cache
def _per_thread_intra_op_pools() -> bool:
    """Whether torch's intra-op parallelism is OpenMP, where the thread count is per thread and so is the team.

    Torch's native thread pool is one pool for the whole process, whose size ``torch.set_num_threads`` sets
    for every thread: there a worker must leave it alone.
    """
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
