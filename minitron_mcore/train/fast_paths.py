"""Megatron-LM's performance settings, chosen for the hardware and libraries present.

On a GPU the settings Megatron-LM's training recipes run with are on by default (``auto``); on
CPU they are off (the fused kernels and overlapped communication need CUDA), but every one of
them that a CPU can run can be turned on with its key, so that tests compare it with the plain
path over gloo:

=============================== ===================================================== ==========
key                             ``auto`` means                                        CPU
=============================== ===================================================== ==========
``parallel.sequence_parallel``  on when ``parallel.tp > 1`` on GPUs (norms, dropout    testable
                                and residuals split over the sequence, Korthikanti et
                                al. 2022)
``train.recompute``             ``selective`` (core attention) for ``seq_length`` >=  testable
                                8192 on GPUs, else ``none``; ``full`` recomputes every
                                layer
``train.gradient_accumulation_  on GPUs where Apex's ``fused_weight_gradient_mlp_cuda`` GPU only
fusion``                        is importable (NGC images): weight gradients are
                                accumulated into the fp32 main grads inside the GEMM
``train.overlap_grad_reduce``   on GPUs with data parallelism: bucketed gradient        testable
                                all-reduce / reduce-scatter overlapped with backward
``train.overlap_param_gather``  on GPUs with the distributed optimizer and data         testable
                                parallelism: the parameter all-gather overlapped with
                                the next forward
=============================== ===================================================== ==========
"""

from __future__ import annotations

import importlib.util

import torch

from minitron_mcore.errors import require

RECOMPUTE = ("auto", "none", "selective", "full")
LONG_SEQUENCE = 8192  # train.recompute=auto recomputes core attention from this length on


def tri_state(value, key: str):
    """``auto`` / ``true`` / ``false`` (Hydra may hand over a bool) -> None / True / False."""
    choice = str(value).lower()
    require(choice in ("auto", "true", "false"), f"{key}={value!r}: use auto, true or false")
    return None if choice == "auto" else choice == "true"


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def sequence_parallel(parallel, seq_length: int) -> bool:
    """``parallel.sequence_parallel`` for a model trained on ``seq_length``-token samples."""
    tp = parallel.tp
    choice = tri_state(parallel.sequence_parallel, "parallel.sequence_parallel")
    on = (tp > 1 and _on_gpu()) if choice is None else choice
    require(
        not on or tp > 1,
        "parallel.sequence_parallel=true splits the sequence over tensor-parallel ranks and "
        "needs parallel.tp > 1; set parallel.tp or leave parallel.sequence_parallel=auto",
    )
    require(
        not on or seq_length % tp == 0,
        f"sequence parallelism splits each sample over parallel.tp={tp} ranks: "
        f"train.seq_length={seq_length} must be a multiple of it",
    )
    return on


def recompute_kwargs(train) -> dict:
    """TransformerConfig fields of ``train.recompute``."""
    choice = str(train.recompute).lower()
    require(choice in RECOMPUTE, f"train.recompute={train.recompute!r}: use one of {RECOMPUTE}")
    if choice == "auto":
        choice = "selective" if _on_gpu() and train.seq_length >= LONG_SEQUENCE else "none"
    if choice == "none":
        return {}
    if choice == "selective":  # Megatron's default module list: core attention
        return {"recompute_granularity": "selective"}
    # full: every layer's input is kept, its activations are recomputed in backward
    return {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }


def have_grad_accum_fusion_kernel() -> bool:
    return _on_gpu() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def gradient_accumulation_fusion(train) -> bool:
    """``train.gradient_accumulation_fusion``; Megatron's output layer needs Apex's kernel for
    it whichever layer spec is used."""
    key = "train.gradient_accumulation_fusion"
    choice = tri_state(train.gradient_accumulation_fusion, key)
    if choice is None:
        return have_grad_accum_fusion_kernel()
    require(
        not choice or have_grad_accum_fusion_kernel(),
        f"{key}=true needs a GPU and Apex's fused_weight_gradient_mlp_cuda (in NGC PyTorch "
        f"containers); use {key}=auto",
    )
    return choice


def model_kwargs(train, parallel) -> dict:
    """TransformerConfig fields of a model that is trained (pretrain, correct, the student of
    distill)."""
    return dict(
        hidden_dropout=train.hidden_dropout,
        attention_dropout=train.attention_dropout,
        calculate_per_token_loss=True,
        sequence_parallel=sequence_parallel(parallel, train.seq_length),
        gradient_accumulation_fusion=gradient_accumulation_fusion(train),
        **recompute_kwargs(train),
    )


def ddp_kwargs(train, distributed_optimizer: bool, dp: int) -> dict:
    """DistributedDataParallelConfig fields of ``train.overlap_*``."""
    grad = tri_state(train.overlap_grad_reduce, "train.overlap_grad_reduce")
    param = tri_state(train.overlap_param_gather, "train.overlap_param_gather")
    grad = (_on_gpu() and dp > 1) if grad is None else grad
    param = (_on_gpu() and dp > 1 and distributed_optimizer) if param is None else param
    require(
        not param or (distributed_optimizer and grad),
        "train.overlap_param_gather=true needs train.distributed_optimizer=true and "
        "train.overlap_grad_reduce on (auto or true)",
    )
    return {"overlap_grad_reduce": grad, "overlap_param_gather": param}


def use_distributed_optimizer(cfg) -> bool:
    """``train.distributed_optimizer``: auto = on GPUs (Megatron's sharded Adam state)."""
    choice = str(cfg.distributed_optimizer).lower()
    require(
        choice in ("auto", "true", "false"),
        "train.distributed_optimizer must be auto, true or false",
    )
    return torch.cuda.is_available() if choice == "auto" else choice == "true"
