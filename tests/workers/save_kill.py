"""Kill a training run (SIGKILL) at fault points of its checkpoint saves; check what is left.

    python save_kill.py RESULT.json WORK_DIR POINTS ARGS...

ARGS is a `minitron` command line whose `save=` lies in WORK_DIR. Imports happen once; every
run is a forked child (a fresh process for Megatron, without paying the imports again):

1. one run without faults -> the reference final weights;
2. for each fault point k in POINTS (comma-separated, 1-based, see minitron_mcore/utils/faults):
   a child run that SIGKILLs itself at point k; then, in the parent, which checkpoint
   `save=` holds now (iteration, or none) and whether every tensor of it reads back; then the
   same command again without faults, the training step `save=` presents then, and whether
   its weights equal the reference.
"""

import json
import os
import shutil
import signal
import sys

import torch  # noqa: F401  (imported before forking, once)

from minitron_mcore import cli
from minitron_mcore.checkpoint.megatron import WeightsReader, read_meta
from minitron_mcore.errors import MinitronError
from minitron_mcore.train.state import read_train_state


def run(args, fault_at=None):
    pid = os.fork()
    if pid == 0:
        if fault_at is not None:
            os.environ["MINITRON_FAULT_AT"] = str(fault_at)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = 1
        try:
            code = cli.main(args)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def weights(save):
    reader = WeightsReader(save)
    return reader.read(list(reader.shapes))


def state_of(save):
    """(iteration or None, every tensor readable)"""
    try:
        read_meta(save)
        it = read_train_state(save)["iteration"]
        weights(save)
        return it, True
    except MinitronError as e:
        return None, "does not exist" in str(e)


def main():
    out, work, points, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    save = next(a.split("=", 1)[1] for a in args if a.startswith("save="))
    assert run(args) == 0
    ref = weights(save)
    results = []
    for k in [int(x) for x in points.split(",")]:
        for p in os.listdir(work):
            shutil.rmtree(os.path.join(work, p), ignore_errors=True)
        code = run(args, fault_at=k)
        it, readable = state_of(save)
        resumed = run(args)
        final_it, _ = state_of(save)
        same = final_it is not None and all(
            torch.equal(ref[n], t) for n, t in weights(save).items()
        )
        results.append(
            dict(
                point=k,
                killed=code == -signal.SIGKILL,
                iteration=it,
                readable=readable,
                resumed=resumed,
                final_iteration=final_it,
                same=same,
            )
        )
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
