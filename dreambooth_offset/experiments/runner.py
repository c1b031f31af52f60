"""Running an experiment's fine-tunes: one after another, or side by side in worker processes."""
from __future__ import annotations

import torch


def default_jobs() -> int:
    """Fine-tunes to run at once: one per CPU core on a CPU-only machine (a small model gains
    little from a second thread, so parallel runs nearly halve the wall time on 2 cores), one on
    a GPU (a real checkpoint wants the whole card)."""
    import os

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_worker_slot = None  # this worker process's number, 1 .. jobs: its progress bar's line


def _init_worker(counter, threads: int) -> None:
    global _worker_slot
    torch.set_num_threads(threads)
    with counter.get_lock():
        counter.value += 1
        _worker_slot = counter.value


def _run_in_worker(run, args: tuple) -> list:
    return run(*args, position=_worker_slot)


def run_all(run, todo: list[tuple], jobs: int, progress) -> list:
    """`run(*args, position=None)` for each `args` of `todo`, in that order; the results' items
    joined in one list. With `jobs` > 1 the runs go to as many spawned worker processes, each with
    an equal share of the CPU threads; `run` must then pickle (a module-level function, or a
    functools.partial of one), and `position` is the worker's progress-bar line."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if jobs <= 1:
        done = []
        for args in todo:
            done.append(run(*args))
            progress.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # forking a process that has run torch can hang
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(ctx.Value("i", 0), max(1, torch.get_num_threads() // jobs))) as pool:
            futures = [pool.submit(_run_in_worker, run, args) for args in todo]
            try:
                for future in as_completed(futures):
                    future.result()  # the first failure raises here, not after the slowest run
                    progress.update()
            except BaseException:  # a failed run stops the experiment: drop the runs not yet started
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        done = [future.result() for future in futures]
    return [item for items in done for item in items]
