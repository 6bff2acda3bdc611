"""Load a Hugging Face model directory with stock transformers and continue a prompt greedily.

python examples/run_hf.py runs/demo/student-hf "def read_file(path):"
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, prompt: str, new_tokens: int = 24) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    print(f"{model_dir}: {type(model).__name__}, {params / 1e6:.2f}M parameters")
    print(repr(tok.decode(out[0])))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "def ")
