"""Load a minitron checkpoint at a given TP/PP, write its logits for a token file, and
optionally re-save the checkpoint from that layout.

    torchrun --nproc-per-node 2 tests/workers/logits.py CKPT TOKENS OUT.safetensors 2 1 [RESAVE]

``MINITRON_TEST_EP=2`` loads a mixture-of-experts model with its experts split over 2 ranks.
"""

import os
import sys


def main(ckpt, tokens_path, out_path, tp, pp, resave=None):
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    from minitron_mcore.checkpoint.megatron import load_model, save_checkpoint, tokenizer_files_of
    from minitron_mcore.models.forward import forward_logits
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    tokens = load_file(tokens_path)["tokens"]
    ep = int(os.environ.get("MINITRON_TEST_EP", "1"))
    with parallel_context(ParallelConfig(tp=int(tp), pp=int(pp), ep=ep)):
        model, meta = load_model(ckpt)
        logits = forward_logits(model, tokens, meta.arch)
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        if logits is not None and first:
            save_file({"logits": logits.float().contiguous()}, out_path)
        if resave:
            save_checkpoint(
                model,
                resave,
                meta.with_step("resave", tp=int(tp), pp=int(pp)),
                tokenizer_files_of(ckpt),
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
