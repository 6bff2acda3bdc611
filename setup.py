"""Install: see README.md (`bash setup.sh` picks the right torch for CPU machines and NGC)."""

from setuptools import find_packages, setup

setup(
    name="minitron_mcore",
    version="0.1.0",
    description="Minitron-style LLM compression (pruning + distillation) on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["minitron_mcore", "minitron_mcore.*"])
    + ["minitron_mcore.conf"],
    # conf/ ships inside the package so an installed copy finds its Hydra configs.
    package_dir={"minitron_mcore.conf": "conf"},
    package_data={"minitron_mcore.conf": ["*.yaml", "*/*.yaml"]},  # model/, recipe/
    install_requires=[
        # torch is not pinned here: setup.sh installs the CPU build (or keeps an NGC container's).
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "transformers>=4.56,<6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece",
        "hydra-core>=1.3,<1.4",
        "psutil",
        "tqdm",
        "matplotlib",  # the pipeline report's plots
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff"],
        "logging": ["tensorboard", "wandb"],
        # lm-evaluation-harness (`minitron evaluate lm_eval_tasks=[...]`, `minitron-lm-eval`);
        # accelerate only for lm-eval's own `hf` model (scoring an export-hf copy alike).
        "eval": ["lm-eval==0.4.13", "accelerate>=0.26"],
    },
    entry_points={
        "console_scripts": [
            "minitron=minitron_mcore.cli:entry",
            # lm-eval's CLI with the `minitron` model registered (lm-eval has no model plugins)
            "minitron-lm-eval=minitron_mcore.evaluate.lm_eval_cli:main",
        ]
    },
)
