"""The device audit (issue 15, ``minitron_mcore/testing/device_audit.py``): on CPU, no stage puts
a host tensor where a GPU run needs one on the device.

The mode's rules on one process, then every stage under the audit: a tiny ``minitron pipeline``
in one process (pretrain, correct, importance with layer-removal passes, prune, distill,
evaluate with the lm-eval adapter, export) and a distillation step at TP=2, PP=2 (4 processes)
with a teacher of another width and depth than the student.

    python3 -m pytest -q tests/test_device_audit.py --durations=0
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, WORKERS, _free_port, launch, read_log

from minitron_mcore.compat.cpu import CudaToCpuMode
from minitron_mcore.testing.device_audit import (
    DEVICE,
    ENV,
    HOST,
    VIOLATION_EXIT,
    DeviceAudit,
    collective_checks,
)

# ---------------------------------------------------------------------------- the mode


@pytest.fixture
def audit():
    with DeviceAudit() as a:
        yield a


def _on_device(audit, *shape) -> torch.nn.Parameter:
    """A parameter of a model that is on the GPU."""
    return audit.tag(torch.nn.Parameter(torch.randn(*shape)), DEVICE)


def _ops(audit) -> list[tuple[str, str]]:
    return [(v["op"], v["inputs"]) for v in audit.report()]


def test_flags_a_host_operand_and_host_tokens(audit):
    w = _on_device(audit, 10, 3)
    w[0] + torch.ones(3)
    torch.nn.functional.embedding(torch.tensor([[1, 2]]), w)
    assert sorted(_ops(audit)) == [
        ("Tensor.add", "device[3] host[3]"),
        ("torch.nn.functional.embedding", "host[1, 2] device[10, 3]"),
    ]


def test_accepts_what_cuda_accepts(audit):
    w = _on_device(audit, 4, 3)
    w * torch.tensor(2.0)  # a 0-dim host tensor is a scalar to CUDA
    moved = torch.ones(3).to(w.device)
    w[0] + moved
    w[0] + torch.zeros(3, device=w.device)
    host = torch.ones(4, 3)
    w.detach().copy_(host)  # copies between host and device are legal
    host.copy_(w.detach())
    w[torch.tensor([0, 2])]  # a host index into a device tensor is legal too
    w[0].cpu() + torch.ones(3)  # host with host
    assert audit.report() == []
    assert audit.tag_of(moved) == DEVICE and audit.tag_of(w.to(torch.float64)) == DEVICE
    assert audit.tag_of(torch.ones(2).to("cpu")) == HOST


def test_to_device_leaves_the_original_on_the_host(audit):
    """On CPU ``.to(device)`` returns the tensor itself; the audit keeps both apart, as the
    copy a GPU makes would be."""
    host = torch.ones(3)
    moved = host.to(_on_device(audit, 3).device)
    assert audit.tag_of(moved) == DEVICE and audit.tag_of(host) == HOST


def test_a_module_built_on_the_host_is_flagged_until_moved(audit):
    """A plain torch module allocates its weights without a device: on a GPU they stay on the
    host until the module is moved (``build_model_for_stage``: ``model.to(device())``)."""
    norm = torch.nn.RMSNorm(3)
    audit.tag(norm.weight, HOST)
    x = torch.ones(2, 3, device=_on_device(audit, 1).device)
    norm(x)
    norm.to(device=audit.device, dtype=torch.float32)
    norm(x)
    assert _ops(audit) == [("torch.nn.functional.rms_norm", "device[2, 3] host[3]")]
    assert audit.tag_of(norm.weight) == DEVICE


def test_host_only_calls_and_backward_are_audited(audit):
    w = _on_device(audit, 3)
    w.detach().numpy()

    class ScaleOnHost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.x = x
            return x * x

        @staticmethod
        def backward(ctx, g):  # g comes from autograd's engine: neutral
            return g * ctx.x * torch.full((3,), 2.0)  # a host tensor built in backward

    ScaleOnHost.apply(w).sum().backward()
    assert sorted(op for op, _ in _ops(audit)) == ["Tensor.mul", "Tensor.numpy"]
    assert audit.tag_of(w.grad) == DEVICE


def test_audit_sees_device_arguments_above_the_compat_mode():
    """Above the CPU compat mode the audit sees ``device="cuda"`` / ``device=0`` as written;
    below it, only the CPU the compat mode rewrote them to."""
    with CudaToCpuMode(), DeviceAudit() as above:
        t = torch.zeros(2, device="cuda")
        u = torch.ones(2, device=0)
        v = torch.ones(2).cuda()
    assert t.device.type == "cpu"  # the compat mode still did its work
    assert [above.tag_of(x) for x in (t, u, v)] == [DEVICE] * 3
    with DeviceAudit() as below, CudaToCpuMode():
        t = torch.zeros(2, device="cuda")
    assert below.tag_of(t) == HOST


def test_host_tensor_through_an_nccl_group_is_flagged(audit):
    owner = not dist.is_initialized()
    with collective_checks(audit):
        if owner:
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        try:
            gloo = dist.new_group([0], backend="gloo")  # Megatron's *_GLOO groups
            nccl = dist.new_group([0], group_desc="TP")  # NCCL on a GPU
            dist.all_reduce(torch.ones(3), group=gloo)
            dist.all_reduce(torch.ones(3, device=audit.device), group=nccl)
            dist.all_gather_object([None], torch.ones(3))  # moves its data itself
            dist.all_reduce(torch.ones(3), group=nccl)
            dist.broadcast(torch.ones(3), src=0)
        finally:
            if owner:
                dist.destroy_process_group()
    assert [(v["op"], v["inputs"]) for v in audit.report()] == [
        ("torch.distributed.all_reduce", "host[3] (host tensor through group TP, NCCL on a GPU)"),
        ("torch.distributed.broadcast", "host[3] (host tensor through group WORLD, NCCL on a GPU)"),
    ]
    assert not hasattr(dist.all_reduce, "_audit_original")  # restored


# ---------------------------------------------------------------------------- the stages

WORKER = os.path.join(WORKERS, "audited.py")
LM_EVAL = importlib.util.find_spec("lm_eval") is not None
on_cpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the audit stands in for a GPU where there is none"
)


def _pipeline_args(run_dir: str, tokenizer: str, corpora: dict) -> list[str]:
    """Every stage once, on the smallest inputs that still exercise it; the student is pruned
    in width and depth (hidden 64 -> 48, ffn 128 -> 64, 4 -> 2 layers)."""
    batch = ["global_batch_size=4", "micro_batch_size=2", "seq_length=32", "eval_iters=1"]
    train = ["steps=1", "warmup_steps=0", *batch]
    tasks = "[minitron_stdlib_mc,minitron_stdlib_gen]" if LM_EVAL else "[]"
    return [
        "pipeline",
        f"run_dir={run_dir}",
        f"pretrain.tokenizer={tokenizer}",
        f"data.original=[{corpora['stdlib-code']}]",
        f"data.distill=[{corpora['stdlib-docs']}]",
        "pretrain.model.num_layers=4",
        "pretrain.model.hidden_size=64",
        "pretrain.model.ffn_hidden_size=128",
        "pretrain.model.num_attention_heads=4",
        "pretrain.model.num_query_groups=2",
        "pretrain.model.kv_channels=16",
        "pretrain.model.vocab_size=512",
        # enough for the teacher to beat a uniform guess (distill checks it)
        *[f"pretrain.train.{k}" for k in ("steps=4", "warmup_steps=1", "lr=1e-2", *batch)],
        "pretrain.train.eval_interval=4",
        *[f"correct.train.{k}" for k in train],
        "importance.num_samples=4",
        "importance.seq_length=32",
        "importance.micro_batch_size=2",
        "importance.layer_loss_samples=2",  # the layer-removal passes (blocks of 1 and 2)
        "students=[{name:wd,target:{hidden_size:48,ffn_hidden_size:64,num_layers:2}}]",
        *[f"distill.train.{k}" for k in train],
        "evaluate.seq_length=32",
        "evaluate.global_batch_size=4",
        "evaluate.micro_batch_size=2",
        "evaluate.iters=1",
        "evaluate.generate_tokens=2",
        f"evaluate.lm_eval_tasks={tasks}",
        "evaluate.lm_eval_limit=2",
    ]


def _audited(args: list[str], report_dir: str, nproc: int = 1):
    """``args`` under the audit: (completed process, one report per rank). A rank that found
    violations exits 86, which torchrun reports as 1."""
    r = launch([WORKER, *args], nproc=nproc, check=False, env={ENV: report_dir})
    files = sorted(glob.glob(os.path.join(report_dir, "rank*.json")))
    reports = [json.load(open(f)) for f in files]
    found = any(rep["violations"] for rep in reports)
    expected = (VIOLATION_EXIT if nproc == 1 else 1) if found else 0
    if len(reports) != nproc or r.returncode != expected:
        raise AssertionError(f"{args[0]} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    for rep in reports:  # the code under test, not another checkout
        assert rep["package"] == os.path.join(ROOT, "minitron_mcore")
    return r, reports


def _no_violations(reports: list[dict]) -> None:
    """Fails with each distinct site once: the ranks that hit it, its inputs, its stack."""
    sites: dict[tuple, tuple[dict, list]] = {}
    for rep in reports:
        for v in rep["violations"]:
            key = (v["kind"], v["op"], v["inputs"], tuple(v["stack"]))
            sites.setdefault(key, (v, []))[1].append(str(rep["rank"]))
    lines = []
    for v, ranks in sorted(sites.values(), key=lambda e: e[0]["stack"][::-1]):
        lines.append(f"rank {','.join(ranks)}: {v['kind']} {v['op']} [{v['inputs']}] x{v['count']}")
        lines += [f"    {frame}" for frame in v["stack"]]
    if lines:
        pytest.fail(f"{len(sites)} sites where host meets device:\n" + "\n".join(lines), False)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tokenizer_dir, corpora):
    root = tmp_path_factory.mktemp("audit")
    run_dir = str(root / "run")
    _, reports = _audited(_pipeline_args(run_dir, tokenizer_dir, corpora), str(root / "reports"))
    return run_dir, reports


def _stage(run_dir: str, name: str) -> dict:
    with open(os.path.join(run_dir, "stages", f"{name}.json")) as f:
        return json.load(f)["metrics"]


def _collectives(reports: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rep in reports:
        for name, n in rep["collectives"].items():
            out[name] = out.get(name, 0) + n
    return out


@on_cpu
def test_every_stage_keeps_host_tensors_off_the_device(pipeline_run):
    run_dir, reports = pipeline_run
    _no_violations(reports)
    # every stage ran, the importance pass with its layer-removal losses, lm-eval with both tasks
    for name in ("teacher", "correct", "importance", "prune.wd", "distill.wd", "export.wd"):
        assert _stage(run_dir, name)
    from safetensors import safe_open

    with safe_open(os.path.join(run_dir, "scores", "scores.safetensors"), "pt") as f:
        assert {"layer_loss.block1", "layer_loss.block2"} <= set(f.keys())
    scores = _stage(run_dir, "evaluate.wd.distilled.distill").get("lm_eval", {})
    assert sorted(scores) == (["minitron_stdlib_gen", "minitron_stdlib_mc"] if LM_EVAL else [])


@on_cpu
@pytest.mark.multiproc
def test_distill_tp2_pp2_keeps_host_tensors_off_the_device(pipeline_run, corpora, tmp_path):
    """Student (2 layers, hidden 48) and teacher (4 layers, hidden 64) on 4 processes."""
    run_dir, _ = pipeline_run
    save = str(tmp_path / "out")
    args = [
        "distill",
        f"load={run_dir}/students/wd/pruned",
        f"teacher={run_dir}/teacher-corrected",
        f"save={save}",
        f"data.train=[{corpora['stdlib-docs']}]",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "train.seq_length=32",
        "train.eval_iters=1",
        "train.precision=fp32",
        "distill.chunk_tokens=16",
        "parallel.tp=2",
        "parallel.pp=2",
    ]
    _, reports = _audited(args, str(tmp_path / "reports"), nproc=4)
    _no_violations(reports)
    assert [r for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    seen = _collectives(reports)  # the pipeline's sends and the tensor-parallel reductions
    assert seen.get("P2POp", 0) > 0 and seen.get("all_reduce", 0) > 0, seen
