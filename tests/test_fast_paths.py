"""The rules that pick Megatron-LM's fast paths (train/fast_paths.py): on GPUs the settings
Megatron-LM runs with, on CPU the plain paths, every key able to turn its path off, and a
one-line error for a choice the machine or the layout cannot run."""

from dataclasses import replace

import pytest

from minitron_mcore.errors import MinitronError
from minitron_mcore.parallel import ParallelConfig
from minitron_mcore.train import fast_paths
from minitron_mcore.train.config import TrainConfig


@pytest.fixture(params=[False, True], ids=["cpu", "gpu"])
def gpu(request, monkeypatch):
    monkeypatch.setattr(fast_paths, "_on_gpu", lambda: request.param)
    return request.param


def test_auto_is_megatron_lms_choice_on_gpus_and_off_on_cpu(gpu, monkeypatch):
    train = TrainConfig(seq_length=4096)
    monkeypatch.setattr(fast_paths, "have_grad_accum_fusion_kernel", lambda: gpu)
    kw = fast_paths.model_kwargs(train, ParallelConfig(tp=8))
    assert kw["sequence_parallel"] is gpu and kw["gradient_accumulation_fusion"] is gpu
    assert kw["calculate_per_token_loss"] and "recompute_granularity" not in kw
    assert fast_paths.model_kwargs(train, ParallelConfig(tp=1))["sequence_parallel"] is False
    long = fast_paths.model_kwargs(replace(train, seq_length=8192), ParallelConfig(tp=8))
    assert long.get("recompute_granularity") == ("selective" if gpu else None)
    assert fast_paths.ddp_kwargs(train, True, dp=4) == {
        "overlap_grad_reduce": gpu,
        "overlap_param_gather": gpu,
    }
    assert fast_paths.ddp_kwargs(train, False, dp=4)["overlap_param_gather"] is False
    assert not any(fast_paths.ddp_kwargs(train, True, dp=1).values())  # nothing to overlap


def test_every_path_can_be_turned_off_and_on(gpu):
    off = TrainConfig(
        recompute="none",
        gradient_accumulation_fusion="false",
        overlap_grad_reduce=False,  # Hydra may hand a bool to these str keys
        overlap_param_gather="false",
    )
    kw = fast_paths.model_kwargs(off, ParallelConfig(tp=2, sequence_parallel="false"))
    assert not kw["sequence_parallel"] and not kw["gradient_accumulation_fusion"]
    assert not any(fast_paths.ddp_kwargs(off, True, dp=8).values())
    on = replace(off, recompute="full", overlap_grad_reduce="true", overlap_param_gather=True)
    kw = fast_paths.model_kwargs(on, ParallelConfig(tp=2, sequence_parallel=True))
    assert kw["sequence_parallel"] and kw["recompute_granularity"] == "full"
    assert kw["recompute_method"] == "uniform" and kw["recompute_num_layers"] == 1
    assert all(fast_paths.ddp_kwargs(on, True, dp=2).values())


@pytest.mark.parametrize(
    "train,parallel,dist_opt,message",
    [
        ({}, {"tp": 1, "sequence_parallel": "true"}, True, "needs parallel.tp > 1"),
        ({"seq_length": 100}, {"tp": 8, "sequence_parallel": "true"}, True, "multiple of it"),
        ({"recompute": "some"}, {}, True, "train.recompute='some'"),
        ({"overlap_grad_reduce": "maybe"}, {}, True, "use auto, true or false"),
        ({"gradient_accumulation_fusion": "true"}, {}, True, "fused_weight_gradient_mlp_cuda"),
        ({"overlap_param_gather": "true"}, {}, False, "needs train.distributed_optimizer"),
    ],
)
def test_impossible_choices_are_one_line_errors(train, parallel, dist_opt, message):
    cfg, par = TrainConfig(**train), ParallelConfig(**parallel)
    with pytest.raises(MinitronError, match=message.replace("(", r"\(")) as e:
        fast_paths.model_kwargs(cfg, par)
        fast_paths.ddp_kwargs(cfg, dist_opt, dp=2)
    assert "\n" not in str(e.value)
