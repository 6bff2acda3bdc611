"""Build a freshly initialised model at PP=<world size> the way ``minitron pretrain`` does
(``parallel_context`` for the groups and seeds, then ``build_model_for_stage``) and write every
randomly initialised matrix of every stage to one file, keyed ``stage<p>/<parameter name>``
(transformer layers carry their global 1-based number: ``decoder.layers.<global>.``).

    torchrun --nproc-per-node 2 tests/workers/pp_init_weights.py OUT.safetensors [SEED]
"""

import os
import sys


def main(out_path, seed="1234"):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from minitron_mcore.models.arch import ModelArch
    from minitron_mcore.models.build import build_model_for_stage
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    arch = ModelArch(num_layers=4, hidden_size=32, ffn_hidden_size=64, vocab_size=128)
    pp = int(os.environ.get("WORLD_SIZE", "1"))
    with parallel_context(ParallelConfig(pp=pp), int(seed)):
        model = build_model_for_stage(arch, torch.float32)
        stage = ps.get_pipeline_model_parallel_rank()
        mine = {}
        for name, p in model.named_parameters():
            if p.dim() < 2:  # norm weights start at 1 on every layer; only matrices are random
                continue
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                global_number = model.decoder.layers[local].layer_number
                name = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{global_number}.")
            mine[f"stage{stage}/{name}"] = p.detach().clone().contiguous()
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        if dist.get_rank() == 0:
            merged = {}
            for part in parts:
                merged.update(part)
            save_file(merged, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
