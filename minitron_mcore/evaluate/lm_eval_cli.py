"""lm-eval's own command line with the ``minitron`` model registered.

    python -m minitron_mcore.evaluate.lm_eval_cli --model minitron --model_args load=CKPT \\
        --tasks minitron_stdlib_mc --include_path examples/lm_eval_tasks --batch_size 16
    minitron-lm-eval --model minitron --model_args load=CKPT,dtype=bf16 --tasks hellaswag
    torchrun --nproc-per-node 2 -m minitron_mcore.evaluate.lm_eval_cli --model minitron \\
        --model_args load=CKPT,tp=2 --tasks hellaswag

Every argument is lm-eval's (``lm_eval --help``). lm-eval finds models only in its registry and
has no plugin entry point for them, so a plain ``lm_eval --model minitron`` cannot work: this
wrapper imports :mod:`minitron_mcore.evaluate.lm_eval_adapter` (which registers the model) and
then runs lm-eval's CLI unchanged. Needs ``pip install -e .[eval]`` (lm-eval).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import minitron_mcore.evaluate.lm_eval_adapter  # noqa: F401  registers `minitron`

    cli_evaluate()


if __name__ == "__main__":
    main()
