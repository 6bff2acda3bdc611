"""Stored top-k teacher predictions and the offline KD loss at TP = world size (gloo): rank 0
saves the stored top-k and, per loss form, the losses and the gradient gathered over ranks."""

import sys

import torch
import torch.distributed as dist
from kd_tp import gather_cols
from test_distill_losses import V_PAD, V_REAL, _data
from test_offline_kd import K

from minitron_mcore.distill.losses import KDSpec
from minitron_mcore.distill.offline import offline_kd, teacher_top_k


def main():
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    part = V_PAD // tp
    sl = slice(rank * part, (rank + 1) * part)
    zs, zt, labels, mask = _data()
    ids, logp, log_tail = teacher_top_k(zt[:, sl], K, V_REAL, rank * part, group)
    out = {"ids": ids, "logp": logp, "log_tail": log_tail}
    for tail in (False, True):
        x = zs[:, sl].clone().requires_grad_(True)
        kd, lm = offline_kd(
            x,
            ids,
            logp.double(),
            log_tail.double(),
            KDSpec(V_REAL),
            tail,
            labels,
            rank * part,
            group,
        )
        (kd * mask).sum().backward()
        out[f"tail={tail}"] = {
            "loss": (kd * mask).sum().detach(),
            "lm": (lm * mask).sum(),
            "grad": gather_cols(x.grad, group),
        }
    if rank == 0:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
