"""What the benchmark scripts share: interleaved timing on a shared machine, memory per call, and one plain
training step.

Every round times each call back to back, so load drifting on a shared machine touches all of them
alike; the reported time is the median over the rounds after warm-up, and a ratio is the median over
rounds of the ratio within a round. Wall-clock and process CPU time are both kept: on a loaded CPU the
CPU time is the stabler measure of compute (exact with one thread; with N threads it also counts the
workers' spinning).

Memory of one call (``memory``): on CUDA ``torch.cuda.max_memory_allocated`` above the resting state (weights
excluded); on the CPU the process's resident set size above the resting state at its peak, read from
``/proc/self/statm`` every millisecond by a thread (glibc is told to mmap every block >= 64 KiB, so a freed
tensor leaves the resident set at once; Linux only), and the bytes the autograd graph saves (exact).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from lightning_reg.module import ConditionalDiffusion

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Bytes ``call`` allocates on ``device`` at its peak, above the resting state (weights excluded)."""
    synchronize(device)
    resting = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - resting


PAGE = os.sysconf("SC_PAGE_SIZE")
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def return_freed_memory() -> None:
    """glibc: give the pages of free heap memory back (``malloc_trim``) and serve every later block >= 64 KiB
    by its own mmap, so that freeing a tensor lowers the resident set size at once."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_peak_above_resting(call, interval: float = 1e-3) -> int:
    """Peak resident set size during ``call()`` minus the size before it (polled every ``interval`` s)."""
    resting, peak, done = resident_bytes(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(interval)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        call()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes()) - resting


def memory(call, model: torch.nn.Module, device: torch.device) -> dict[str, int]:
    """``{"peak": bytes}`` of ``call`` (module docstring), and on the CPU ``"saved"``: its autograd graph's bytes."""
    if device.type == "cuda":
        return {"peak": cuda_peak_bytes(call, device)}
    return_freed_memory()  # else pages a previous call left in malloc's free lists hide this call's peak
    peak = rss_peak_above_resting(call)
    saved = [0]
    with saved_tensor_bytes(model, saved):
        call()
    return {"peak": peak, "saved": saved[0]}


@contextmanager
def saved_tensor_bytes(model: nn.Module, total: list[int]):
    """Adds to ``total[0]`` the bytes of distinct non-parameter storages saved for backward."""
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def interleaved_times(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Per call and clock, the seconds of each of ``repeats`` rounds after ``warmup`` untimed ones."""
    times = {name: {clock: [] for clock in CLOCKS} for name in calls}
    for r in range(warmup + repeats):
        for name, call in calls.items():
            synchronize(device)
            start = {clock: now() for clock, now in CLOCKS.items()}
            call()
            synchronize(device)
            if r >= warmup:
                for clock, now in CLOCKS.items():
                    times[name][clock].append(now() - start[clock])
    return times


def medians(times: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, float]]:
    """Per call: the median ``wall`` and ``cpu`` seconds, and ``<clock>_ratio``, the median over rounds
    of the ratio to ``reference`` within the round."""
    return {name: {key: value for clock, seconds in per_clock.items() for key, value in (
        (clock, statistics.median(seconds)),
        (f"{clock}_ratio", statistics.median(a / b for a, b in zip(seconds, times[reference][clock]))))}
        for name, per_clock in times.items()}


def plain_optimizer(module: ConditionalDiffusion):
    """The module's own AdamW and warm-up schedule (``configure_optimizers``), for a loop without a Trainer."""
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def plain_training_step(module: ConditionalDiffusion, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, x0: Tensor, y: Tensor) -> Tensor:
    """What ``ConditionalDiffusion`` does per batch under a Trainer, without one (and without logging):
    the label check, label dropout, the diffusion loss, backward, the AdamW and schedule steps, the EMA update."""
    module.denoiser.conditioning.check(y, allow_null=True)
    loss = module.diffusion_loss(module.net, x0, module.drop_labels(y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    module.ema.update_parameters(module.net)
    return loss.detach()
