"""What every process of a multi-process run (DDP: one node or many, ``docs/distributed.md``) does when one of
them fails, so that no process is left waiting in a collective for a peer that will never come.

- Input is checked on every rank (a checkpoint path can exist on one node and not on another) and the ranks
  agree on the outcome right after the process group starts (``agree``): if any rank's check failed, every
  rank exits with status 2 and rank 0 prints one ``error: rank R of W: ...`` line per failing rank.
- A rank that raises later (``handle_exit``) prints its traceback and ``error: rank R of W: <cause>``
  and ends its process at once; its peers, blocked in a collective with it, then fail on the lost
  connection and end the same way, naming the lost peer as their cause.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback

from lightning_reg.errors import ConfigError, one_line

# How the process group reports a peer that has gone (gloo, NCCL and the TCP store).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
              "Connection refused", "timed out", "Timed out")


def started_group():
    """``torch.distributed`` once its process group has started, else ``None`` (never imported: not started, so
    ``fail`` on a command line's arguments needs no torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """``(global rank, world size)``: the process group's if started, else the launcher's environment
    (torchrun's ``RANK`` / ``WORLD_SIZE``, SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS``)."""
    dist = started_group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    return int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))


def started_together(num_nodes: int = 1) -> bool:
    """Whether this process's peers exist already or start on their own (torchrun, SLURM's ``srun``, the
    processes Lightning starts, another node), so that it must not fail alone before the process group
    starts: it checks its input, then ``agree``s with them."""
    env = os.environ
    launched = "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", 1)) > 1
    return launched or int(env.get("SLURM_NTASKS", 1)) > 1 or num_nodes > 1


def rank_prefix() -> str:
    """``"rank R of W: "`` in a multi-process run, else ``""``."""
    rank, world = rank_and_world()
    return f"rank {rank} of {world}: " if world > 1 else ""


def fail(message: str) -> None:
    """End a command-line run on bad input: one ``error:`` line on stderr (naming the rank in a multi-process
    run) and exit status 2."""
    print(f"error: {rank_prefix()}{message}", file=sys.stderr, flush=True)
    sys.exit(2)


def failure_line(err: BaseException) -> str:
    """One line for a failed rank: its exception, or for a collective that lost its peer, that it did."""
    import torch.distributed as dist

    cause = f"{type(err).__name__}: {one_line(err)}"
    if isinstance(err, dist.DistError) or any(s in str(err) for s in _LOST_PEER):
        return f"{rank_prefix()}lost contact with another process (its own error line names the cause): {cause}"
    return f"{rank_prefix()}{cause}"


def check(build):
    """``(build(), None)``, or ``(None, message)`` for the ``ConfigError`` (or other exception) it raised."""
    try:
        return build(), None
    except ConfigError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - reported through agree(), with its traceback here
        traceback.print_exc()
        return None, f"{type(err).__name__}: {one_line(err)}"


def agree(error: str | None) -> None:
    """Every rank of the started process group calls this with its own check's outcome (``None``: passed).
    If any rank failed, every rank exits with status 2: rank 0 prints one ``error:`` line per failing rank,
    each other failing rank its own."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    errors = [None] * world
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    mine = failed if rank == 0 else [(r, e) for r, e in failed if r == rank]
    for r, e in mine:
        print(f"error: rank {r} of {world}: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def close() -> None:
    """Destroy the process group if one was started (a process that exits with it alive can abort in
    its threads' destructors: "terminate called without an active exception")."""
    dist = started_group()
    if dist is not None:
        dist.destroy_process_group()


def handle_exit() -> None:
    """From now on, the process group is closed at exit, and an exception that ends the program in a
    multi-process run prints its traceback and ``error: rank R of W: <cause>`` and ends this process at once
    (``os._exit(1)``), closing its connections so that its peers stop waiting for it; a single process keeps
    Python's usual ending."""
    previous = sys.excepthook
    if getattr(previous, "ends_the_rank", False):
        return
    atexit.register(close)

    def hook(kind, err, tb):
        if rank_and_world()[1] == 1 or not isinstance(err, Exception):
            return previous(kind, err, tb)
        stderr = sys.__stderr__  # torch's own hook (init_process_group) calls this one with sys.stderr captured
        traceback.print_exception(kind, err, tb, file=stderr)
        print(f"error: {failure_line(err)}", file=stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    hook.ends_the_rank = True
    sys.excepthook = hook
