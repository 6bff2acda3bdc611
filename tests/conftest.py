"""Shared fixtures: tiny random HF models of every family (made locally), CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")
FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]
# Per-family test cases: tied embeddings are also covered by qwen2 and qwen3, so the tied Llama
# runs with the slow set (CI stays under its time).
FAMILY_CASES = [
    pytest.param(f, marks=pytest.mark.slow) if f == "llama-tied" else f for f in FAMILIES
]
# ... and where a test's per-family cases repeat one another's code paths, the families
# added last run with the slow set too.
FAMILY_CASES_CORE = [
    f if f in ("llama", "mistral", "qwen2") else pytest.param(f, marks=pytest.mark.slow)
    for f in FAMILIES
]


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")]
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def launch(
    args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600, env: dict = None
):
    """Run ``python -m minitron_mcore``-style argv (or a worker script) in fresh processes:
    torchrun with ``nproc`` > 1, plain python otherwise; ``env`` adds environment variables."""
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_free_port()),
        ] + args
    else:
        cmd = [sys.executable] + args
    full_env = dict(_env(), **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def run_and_kill_when(args: list[str], path: str, timeout: int = 900) -> None:
    """Start ``python -m minitron_mcore *args`` and SIGKILL it the moment ``path`` exists (a
    crash at a known point of a run, e.g. right after its first checkpoint)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "minitron_mcore", *args],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minitron(*overrides: str, nproc: int = 1, check: bool = True):
    """The CLI as users run it: ``[torchrun ...] -m minitron_mcore <command> key=value ...``."""
    return launch(["-m", "minitron_mcore", *overrides], nproc=nproc, check=check)


def megatron_logits(
    ckpt: str, tokens_file: str, out: str, tp: int = 1, pp: int = 1, resave: str | None = None
) -> torch.Tensor:
    from safetensors.torch import load_file

    args = [os.path.join(WORKERS, "logits.py"), ckpt, tokens_file, out, str(tp), str(pp)]
    launch(args + ([resave] if resave else []), nproc=tp * pp)
    return load_file(out)["logits"]


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from minitron_mcore.testing.hf_models import make_tokenizer

    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, tokenizer_dir):
    """family -> directory of a tiny random HF model (fp32) with its tokenizer."""
    from minitron_mcore.testing.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {
        f: make_hf_model(f, str(root / f), seed=i, tokenizer_dir=tokenizer_dir)
        for i, f in enumerate(FAMILIES)
    }


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory):
    """A fixed batch of token ids [2, 24] saved for worker processes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (2, 24), generator=g)
    path = str(tmp_path_factory.mktemp("tokens") / "tokens.safetensors")
    save_file({"tokens": tokens}, path)
    return path


@pytest.fixture(scope="session")
def tokens(tokens_file):
    from safetensors.torch import load_file

    return load_file(tokens_file)["tokens"]


@pytest.fixture(scope="session")
def corpora(tmp_path_factory, tokenizer_dir):
    """Two small indexed datasets tokenized with the shared tokenizer: stdlib code and stdlib
    docstrings (a shifted distribution)."""
    from minitron_mcore.data.demo import write_demo
    from minitron_mcore.data.preprocess import iter_documents, write_indexed

    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for name in ("stdlib-code", "stdlib-docs"):
        src = write_demo(name, str(root / "src"), max_docs=150)
        out[name] = write_indexed(
            iter_documents([src], "text", "file"), tokenizer_dir, str(root / name), workers=1
        ) and str(root / name)
    return out


@pytest.fixture(scope="session")
def llama_ckpt(hf_models, tmp_path_factory):
    """The tiny Llama imported once (fp32, TP=1) for training tests."""
    path = str(tmp_path_factory.mktemp("llama_ckpt") / "ckpt")
    minitron("import-hf", f"load={hf_models['llama']}", f"save={path}", "dtype=fp32")
    return path


def read_log(path: str) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def canonical_weights(ckpt):
    """Every global tensor of a checkpoint, read back from its files."""
    from minitron_mcore.checkpoint.megatron import WeightsReader

    reader = WeightsReader(ckpt)
    return reader.read(list(reader.shapes))
