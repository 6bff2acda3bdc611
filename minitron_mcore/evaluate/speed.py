"""Generation speed of an exported model with stock ``transformers`` (the inference side of the
papers' trade-off: depth-pruned students generate faster, width-pruned ones are more accurate).
"""

from __future__ import annotations

import statistics
import time

PROMPTS = ("def read_file(path):", "Return the number of", "class Config:")


def generation_speed(hf_dir: str, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Greedy decoding of ``new_tokens`` tokens, batch 1, on the GPU when there is one, else the
    CPU: the best tokens/s over the prompts and ``repeats`` (after one warm-up round), as
    ``timeit`` takes the fastest run - other work on a shared machine only ever slows a run
    down, so the fastest is the one closest to the model's own speed (the median is kept too,
    as ``gen_tokens_per_s_median``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, local_files_only=True, use_safetensors=True
    )
    model = model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rates = []
    with torch.no_grad():
        for i in range(repeats + 1):
            for prompt in PROMPTS:
                ids = tok(prompt, return_tensors="pt").input_ids.to(device)
                t0 = time.perf_counter()
                model.generate(ids, pad_token_id=pad, **kw)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i > 0:  # the first round warms up
                    rates.append(new_tokens / (time.perf_counter() - t0))
    return {
        "gen_tokens_per_s": max(rates),
        "gen_tokens_per_s_median": statistics.median(rates),
        "gen_new_tokens": new_tokens,
        "gen_device": device,
        "hf_params": sum(p.numel() for p in model.parameters()),
    }
