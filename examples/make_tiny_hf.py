"""Write a tiny random Hugging Face model (and a locally trained tokenizer) to a directory.

    python examples/make_tiny_hf.py --family llama --out runs/tiny-hf

Families: llama, llama-tied, mistral, qwen2 (shapes in minitron_mcore/testing/hf_models.py).
Nothing is downloaded: the tokenizer is trained on the Python standard library's source.
"""

import argparse

from minitron_mcore.testing.hf_models import TINY, make_hf_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llama", choices=sorted(TINY))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_hf_model(args.family, args.out, seed=args.seed))


if __name__ == "__main__":
    main()
