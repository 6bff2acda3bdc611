"""Logits of one checkpoint under the Transformer Engine layer spec and under the local spec, in
fp32 and bf16, on one GPU (the worker of ``tests/gpu/test_te_spec.py``):

    python tests/gpu/te_logits.py CKPT TOKENS.safetensors OUT.safetensors

OUT holds ``{te,local}_{fp32,bf16}``: full-vocabulary logits [b, s, vocab] in fp32, and in its
metadata the class of each model's core attention (so the test sees which spec was built).
Where Transformer Engine does not import, OUT's metadata holds only ``te_error``.
"""

import sys

DTYPES = ("fp32", "bf16")


def core_attention_class(model) -> str:
    return type(model.decoder.layers[0].self_attention.core_attention).__name__


def spec_logits(ckpt: str, tokens, use_te: bool) -> tuple[dict, str]:
    """``{dtype name: logits [b, s, vocab] fp32 on the CPU}`` and the core attention class."""
    from minitron_mcore.checkpoint.megatron import load_model
    from minitron_mcore.models.build import resolve_dtype
    from minitron_mcore.models.forward import forward_logits

    out, attention = {}, ""
    for name in DTYPES:
        model, meta = load_model(ckpt, resolve_dtype(name), use_te=use_te)
        out[name] = forward_logits(model, tokens, meta.arch).float().cpu()
        attention = core_attention_class(model)
        del model
    return out, attention


def main(ckpt: str, tokens_path: str, out_path: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    try:
        import transformer_engine  # noqa: F401
    except Exception as e:  # an install that fails to import is "not importable" as well
        save_file({"none": torch.zeros(1)}, out_path, metadata={"te_error": f"{e!r}"[:500]})
        return
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    tokens = load_file(tokens_path)["tokens"]  # [b, s]
    tensors, meta = {}, {}
    with parallel_context(ParallelConfig()):
        for spec, use_te in (("te", True), ("local", False)):
            logits, meta[f"{spec}_attention"] = spec_logits(ckpt, tokens, use_te)
            tensors.update({f"{spec}_{name}": t.contiguous() for name, t in logits.items()})
    save_file(tensors, out_path, metadata=meta)


if __name__ == "__main__":
    main(*sys.argv[1:])
