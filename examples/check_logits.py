"""Compare the logits of two Hugging Face model directories on the same random tokens.

python examples/check_logits.py runs/tiny-hf runs/tiny-hf-export
"""

import sys

import torch
from transformers import AutoModelForCausalLM


def main(a: str, b: str) -> None:
    ma = AutoModelForCausalLM.from_pretrained(
        a, dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    mb = AutoModelForCausalLM.from_pretrained(
        b, dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    tokens = torch.randint(
        0, ma.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (ma(tokens).logits - mb(tokens).logits).abs().max().item()
    print(f"max |logit difference| = {diff:.3g}")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
