"""Vocab-parallel KD at TP = world size (gloo): every rank computes on its vocabulary slice;
rank 0 saves the losses and the gradients gathered over ranks."""

import sys

import torch
import torch.distributed as dist
from test_distill_losses import SPECS, V_PAD, _data

from minitron_mcore.distill.losses import chunked_kd, vocab_parallel_kd


def gather_cols(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main():
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    part = V_PAD // tp
    sl = slice(rank * part, (rank + 1) * part)
    zs, zt, labels, mask = _data()
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(zs.shape[0], 8, generator=g, dtype=torch.float64)
    ws = torch.randn(V_PAD, 8, generator=g, dtype=torch.float64)
    ht = torch.randn(zs.shape[0], 12, generator=g, dtype=torch.float64)
    wt = torch.randn(V_PAD, 12, generator=g, dtype=torch.float64)
    out = {}
    for name, spec in SPECS.items():
        x = zs[:, sl].clone().requires_grad_(True)
        kd, lm = vocab_parallel_kd(x, zt[:, sl], spec, labels, rank * part, group)
        (kd * mask).sum().backward()
        r = {"loss": (kd * mask).sum().detach(), "lm": (lm * mask).sum()}
        r["grad"] = gather_cols(x.grad, group)
        # chunked with the output layer vs unchunked, both on this rank's vocabulary rows
        a = [hs.clone().requires_grad_(True), ws[sl].clone().requires_grad_(True)]
        kd2, _ = vocab_parallel_kd(
            a[0] @ a[1].t(), ht @ wt[sl].t(), spec, labels, rank * part, group
        )
        (kd2 * mask).sum().backward()
        b = [hs.clone().requires_grad_(True), ws[sl].clone().requires_grad_(True)]
        c, _ = chunked_kd(b[0], b[1], ht, wt[sl], spec, mask, labels, rank * part, 5, group)
        c.backward()
        # the caller sums hidden-state gradients over TP ranks (copy_to_..._region's backward)
        for t in (a[0].grad, b[0].grad):
            dist.all_reduce(t, group=group)
        r["chunked_loss"], r["unchunked_loss"] = c.detach(), (kd2 * mask).sum().detach()
        r["chunked_grad_h"], r["unchunked_grad_h"] = b[0].grad, a[0].grad
        r["chunked_grad_w"] = gather_cols(b[1].grad.t(), group)
        r["unchunked_grad_w"] = gather_cols(a[1].grad.t(), group)
        out[name] = r
    if rank == 0:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
