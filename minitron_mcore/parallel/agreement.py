"""Ranks that agree: a failure on one rank raised on every rank at once
(:func:`fail_together`), decisions taken by rank 0 for all (:func:`rank0_decides`), and which
rank prints a user error (:func:`should_print_error`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch.distributed as dist

from minitron_mcore.errors import MinitronError, storage_error
from minitron_mcore.parallel.launch_env import launcher_ranks

# ------------------------------------------------------------------- one message per error
#
# Under torchrun / srun every rank runs the CLI, and an input error is usually raised by all of
# them alike; the CLI prints it once (should_print_error).  The rule never hides the only copy
# of a message:
# * rank 0 always prints;
# * an error raised inside parallel_context (the ranks may have diverged: pipeline stages, data
#   shards): before the group is torn down, rank 0 posts its message in the process group's
#   key-value store and ranks > 0 wait up to _RANK0_ERROR_WAIT seconds for it.  Same message:
#   silent.  Different, or none (rank 0 is fine and busy elsewhere), or no store: print it;
# * an error raised outside it (config, input checks on files, before the process group): all
#   ranks run the same code on the same argv, so on rank 0's node rank 0 speaks for all; the
#   first rank of every other node prints too, since its files may differ (a node-local disk).
#   An identical input error is printed once per node.

_RANK0_ERROR_KEY = "minitron/error/rank0"
_RANK0_ERROR_WAIT = 5.0


def compare_error_with_rank0(exc: MinitronError) -> None:
    """Record on ``exc`` whether rank 0 raised the same error (``minitron_rank0_same``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() == 0:
            store.set(_RANK0_ERROR_KEY, str(exc))
            return
        # Poll with check(): a timed-out store.wait() logs a c10d socket warning on stderr.
        deadline = time.monotonic() + _RANK0_ERROR_WAIT
        while not store.check([_RANK0_ERROR_KEY]) and time.monotonic() < deadline:
            time.sleep(0.05)
        posted = store.check([_RANK0_ERROR_KEY])
        exc.minitron_rank0_same = posted and store.get(_RANK0_ERROR_KEY).decode() == str(exc)
    except Exception:  # no answer from rank 0 (or the store): this rank prints its own error
        exc.minitron_rank0_same = False


def should_print_error(exc: BaseException, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process prints ``exc`` (see the rule above)."""
    ranks = launcher_ranks(environ)
    if ranks is None or ranks[0] == 0:
        return True
    rank0_same = getattr(exc, "minitron_rank0_same", None)
    if rank0_same is not None:
        return not rank0_same
    return ranks[1] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _failure(e: BaseException) -> tuple[bool, str]:
    """(a user error?, its one-line text)."""
    if isinstance(e, MinitronError):
        return True, str(e)
    if isinstance(e, OSError):
        try:
            return True, str(storage_error(e))
        except OSError:
            pass
    return False, f"{type(e).__name__}: {e}"


def fail_together(fn: Callable[[], None], rank0_only: bool = False) -> None:
    """Run ``fn`` on every rank (``rank0_only``: on rank 0 alone) and agree on the outcome.

    Without this, a rank whose ``fn`` fails (a full disk under rank 0's sidecar, an unwritable
    file of one rank's training state) raises while the other ranks wait at the next collective
    until the process-group timeout - 30 minutes of a job doing nothing. Here every rank learns
    of the failure at once and raises it: a user error (or a full disk, a read-only path) as the
    same :class:`MinitronError` on every rank, so it is printed once; any other exception keeps
    its traceback on the rank where it happened. Also a barrier: nobody continues before every
    rank's ``fn`` is done (with ``rank0_only``: before rank 0's is)."""
    err = None
    if not rank0_only or is_rank0():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
            err = e
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if err is not None:
            raise err
        return
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if err is None else _failure(err))
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if err is not None and not _failure(err)[0]:
        raise err  # a bug: its traceback, on the rank where it happened
    rank, (user, text) = failed[0]
    message = text if user else f"rank {rank} failed ({text}); see its traceback"
    raise MinitronError(message) from err


def rank0_decides(fn: Callable[[], object]):
    """``fn()`` run on rank 0 alone and its result given to every rank (its error raised on
    every rank, as :func:`fail_together` does). For the decisions a command reads from the
    file system at start-up (what to resume from, whether the output is already complete):
    ranks that list a directory each on their own can see it at different moments."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list = [None]

    def run():
        box[0] = fn()

    fail_together(run, rank0_only=True)
    dist.broadcast_object_list(box, src=0)
    return box[0]
