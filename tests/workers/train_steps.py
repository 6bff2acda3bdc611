"""Train a checkpoint for a few steps on fixed random data at a given TP/PP (DP = the rest)
and write the loss trajectory.

    torchrun --nproc-per-node 4 tests/workers/train_steps.py CKPT OUT.json TP PP STEPS
"""

import json
import sys

import torch


def batches(vocab, steps, global_batch, seq, dp_rank, dp_size, mbs):
    g = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        data = torch.randint(0, vocab, (global_batch, seq + 1), generator=g)
        share = data.chunk(dp_size)[dp_rank]
        out = []
        for mb in share.split(mbs):
            tokens, labels = mb[:, :-1].contiguous(), mb[:, 1:].contiguous()
            pos = torch.arange(seq).unsqueeze(0).expand_as(tokens)
            out.append(
                dict(
                    tokens=tokens,
                    labels=labels,
                    position_ids=pos,
                    loss_mask=torch.ones_like(tokens, dtype=torch.float),
                )
            )
        yield out


def main(ckpt, out_path, tp, pp, steps, dist_opt="false"):
    from megatron.core import parallel_state as ps

    from minitron_mcore.checkpoint.megatron import load_model
    from minitron_mcore.parallel import ParallelConfig, parallel_context
    from minitron_mcore.train import optim
    from minitron_mcore.train.step import lm_forward_step, train_step

    with parallel_context(ParallelConfig(tp=int(tp), pp=int(pp))):
        model, meta = load_model(ckpt, calculate_per_token_loss=True)
        cfg = optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1)
        use_dist = dist_opt == "true"
        ddp = optim.wrap_ddp(model, model.config, use_dist)
        opt = optim.build_optimizer(ddp, cfg, model.config, use_dist)
        sched = optim.build_scheduler(opt, cfg, int(steps))
        optim.attach_to_config(model.config, ddp, opt)
        losses = []
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        for mbs in batches(meta.arch.vocab_size, int(steps), 8, 32, dpr, dp, 2):
            loss, gnorm, lr = train_step(
                ddp, opt, sched, lm_forward_step(meta.arch.vocab_size), mbs, 32
            )
            losses.append(dict(loss=loss, grad_norm=float(gnorm), lr=lr))
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dpr == 0:
            with open(out_path, "w") as f:
                json.dump(losses, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
