"""`minitron pipeline` end to end on a tiny configuration: the report matches the checkpoints,
distillation improves both students, a kill during distillation resumes to the same students,
finished steps are skipped, a changed step is refused, a failing variant spares the others,
and the papers' recipes dry-run."""

import json
import os

import pytest
import torch
from conftest import WORKERS, canonical_weights, launch, minitron, run_and_kill_when

pytestmark = pytest.mark.multiproc

TINY = [
    "pretrain.model.num_layers=4",
    "pretrain.model.hidden_size=64",
    "pretrain.model.ffn_hidden_size=128",
    "pretrain.model.num_attention_heads=4",
    "pretrain.model.num_query_groups=2",
    "pretrain.model.kv_channels=16",
    "pretrain.model.vocab_size=300",
    "pretrain.train.steps=150",
    "pretrain.train.global_batch_size=8",
    "pretrain.train.micro_batch_size=4",
    "pretrain.train.seq_length=64",
    "pretrain.train.eval_iters=1",
    "correct.train.steps=10",
    "correct.train.warmup_steps=2",
    "correct.train.global_batch_size=8",
    "correct.train.micro_batch_size=4",
    "correct.train.seq_length=64",
    "correct.train.eval_iters=1",
    "importance.num_samples=16",
    "importance.seq_length=64",
    "importance.micro_batch_size=4",
    "importance.layer_loss_samples=8",
    "students.0.target.hidden_size=48",
    "students.0.target.ffn_hidden_size=64",
    "students.1.target.num_layers=2",
    "distill.train.steps=40",
    "distill.train.warmup_steps=2",
    "distill.train.global_batch_size=8",
    "distill.train.micro_batch_size=4",
    "distill.train.seq_length=64",
    "distill.train.eval_iters=1",
    "distill.train.eval_interval=20",
    "distill.train.save_interval=20",
    "distill.train.lr=1e-3",
    "evaluate.seq_length=64",
    "evaluate.global_batch_size=8",
    "evaluate.micro_batch_size=4",
    "evaluate.iters=2",
    "evaluate.generate_tokens=8",
    "evaluate.lm_eval_tasks=[]",  # (scored in tests/test_lm_eval.py)
]


def _pipeline(run_dir, *extra, check=True):
    return minitron("pipeline", f"run_dir={run_dir}", *TINY, *extra, check=check)


def _marker(run_dir, step):
    with open(os.path.join(run_dir, "stages", f"{step}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny pipeline, run through a worker that counts the process groups it creates."""
    run_dir = str(tmp_path_factory.mktemp("pipeline") / "run")
    counts = run_dir + ".groups.json"
    worker = os.path.join(WORKERS, "count_groups.py")
    r = launch([worker, counts, "pipeline", f"run_dir={run_dir}", *TINY])
    return run_dir, r


def test_model_parallel_groups_are_made_once_per_layout(finished):
    """~15 commands in one process group, one layout: Megatron's groups are made once (every
    set is a set of NCCL communicators per GPU), and no other group is made."""
    with open(finished[0] + ".groups.json") as f:
        counts = json.load(f)
    assert len(counts["inits"]) == 1 and counts["inits"][0] > 0, counts
    assert counts["new_groups"] == counts["inits"][0], counts


def _hf_valid_loss(run_dir, hf_dir, corpus_key):
    """The exported model's loss in stock transformers on the held-out samples `evaluate`
    scored (rebuilt here with the same dataset code and seed)."""
    from transformers import AutoModelForCausalLM

    from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_eval_dataset
    from minitron_mcore.data.tokenizer import Tokenizer

    rec = _marker(run_dir, f"evaluate.{corpus_key}")
    c = rec["config"]
    data = DataConfig(**c["data"])
    tok = Tokenizer(hf_dir)
    samples = c["iters"] * c["global_batch_size"]
    ds = build_eval_dataset(data, tok, c["seq_length"], c["seed"], samples, held_out=True)
    batches = GlobalBatches(ds, c["global_batch_size"], c["micro_batch_size"], 0, 1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tot = cnt = 0.0
    with torch.no_grad():
        for i in range(c["iters"]):
            for mb in batches.get(i):
                logits = model(mb["tokens"]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), mb["labels"], reduction="none"
                )
                tot += float((loss * mb["loss_mask"]).sum())
                cnt += float(mb["loss_mask"].sum())
    return tot / cnt, rec["metrics"]["valid_loss"]


def test_report_matches_the_checkpoints_and_distillation_helps(finished):
    run_dir, r = finished
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["command"] == "pipeline" and not summary["failed"]
    report = open(os.path.join(run_dir, "report.md")).read()
    for name in ("teacher-corrected", "width.pruned", "width.distilled", "depth.distilled"):
        assert f"`{name}`" in report
    for png in ("training_curves", "students_valid", "layer_importance", "kept_fraction"):
        assert os.path.getsize(os.path.join(run_dir, "plots", f"{png}.png")) > 1000
        assert f"plots/{png}.png" in report
    assert "minitron distill load=" in report and "minitron correct load=" in report
    for v in ("width", "depth"):
        got, reported = _hf_valid_loss(
            run_dir, os.path.join(run_dir, "hf", v), f"{v}.distilled.distill"
        )
        assert abs(got - reported) <= 1e-3, (v, got, reported)
        assert f"{reported:.4f}" in report
        pruned = _marker(run_dir, f"evaluate.{v}.pruned.distill")["metrics"]["valid_loss"]
        assert reported < pruned, (v, reported, pruned)
        gen = _marker(run_dir, f"export.{v}")["metrics"]["gen_tokens_per_s"]
        assert gen > 0


def test_rerun_is_a_no_op_and_a_changed_step_is_refused(finished):
    run_dir, _ = finished
    before = os.path.getmtime(os.path.join(run_dir, "stages", "distill.width.json"))
    r = _pipeline(run_dir)
    assert "running distill" not in r.stderr and "done    distill.width" in r.stderr
    assert os.path.getmtime(os.path.join(run_dir, "stages", "distill.width.json")) == before
    r = _pipeline(run_dir, "distill.train.lr=2e-3", check=False)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "distill.width" in errors[0] and "pipeline.rerun_from=distill.width" in errors[0]


@pytest.mark.slow  # ~30 s; the fault driver's full run kills the pipeline at 10 moments
def test_kill_during_distillation_resumes_to_the_same_students(finished, tmp_path):
    ref_dir, _ = finished
    run_dir = str(tmp_path / "run")
    args = ["pipeline", f"run_dir={run_dir}", *TINY]
    # killed right after the width student's first distillation checkpoint
    run_and_kill_when(
        args, os.path.join(run_dir, "students", "width", "distilled", "minitron.json")
    )
    assert not os.path.exists(os.path.join(run_dir, "stages", "distill.width.json"))
    minitron(*args)
    for v in ("width", "depth"):
        a = canonical_weights(os.path.join(ref_dir, "students", v, "distilled"))
        b = canonical_weights(os.path.join(run_dir, "students", v, "distilled"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (v, k)


def test_failing_variant_spares_the_others(finished, tmp_path):
    """A third student whose prune step fails at run time; the finished steps of the run are
    reused (pipeline.from) and the other students are unaffected."""
    ref_dir, _ = finished
    run_dir = str(tmp_path / "run")
    r = _pipeline(
        run_dir,
        f"pipeline.from.teacher={ref_dir}/teacher",
        f"pipeline.from.correct={ref_dir}/teacher-corrected",
        f"pipeline.from.importance={ref_dir}/scores",
        "students.0.agg=nope-nope",
        "pipeline.skip=[evaluate,export]",
        check=False,
    )
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "width" in errors[0], r.stderr[-3000:]
    assert os.path.exists(os.path.join(run_dir, "stages", "distill.depth.json"))
    assert not os.path.exists(os.path.join(run_dir, "stages", "distill.width.json"))
    assert "Failed student variants" in open(os.path.join(run_dir, "report.md")).read()
    assert not os.path.exists(os.path.join(run_dir, "teacher"))  # fed, not rebuilt


@pytest.mark.parametrize(
    "recipe,want",
    [
        (
            "minitron-4b-width",
            [
                "peak lr 0.0001 -> min lr 1e-05, 40 warmup steps, cosine, 9961 steps x global "
                "batch 1152 x 8192 tokens",
                "120 warmup steps, cosine, 13458 steps",
                "94.00B training tokens",
            ],
        ),
        ("minitron-4b-depth", ["prune.target.num_layers=2", "importance.block_sizes=[1,2]"]),
        (
            "qwen3-8b-to-4b",
            [
                "peak lr 0.2 x the teacher's recorded peak -> min lr lr/10, 120 warmup steps",
                "9961 steps x global batch 1152 x 8192 tokens",
                "94.00B training tokens",
            ],
        ),
        (
            "mn-minitron-8b",
            ["peak lr 0.0001 -> min lr 4.5e-07, 60 warmup steps", "380.00B training tokens"],
        ),
    ],
)
def test_recipes_dry_run(hf_models, tmp_path, recipe, want):
    """Each paper recipe composes and dry-runs against a tiny teacher (its targets and layout
    scaled down; the schedules, batches, learning rates and budgets are the paper's)."""
    tiny = ["parallel.tp=1", "importance.seq_length=64", "evaluate.seq_length=64"]
    if "depth" in recipe:
        tiny += ["students.0.target.num_layers=2"]
    else:
        tiny += ["students.0.target.hidden_size=48", "students.0.target.ffn_hidden_size=64"]
    r = minitron(
        "pipeline",
        f"+recipe={recipe}",
        f"run_dir={tmp_path}/run",
        f"teacher={hf_models['qwen3' if recipe.startswith('qwen3') else 'llama']}",
        "pipeline.dry_run=true",
        *tiny,
    )
    for w in want:
        assert w in r.stdout, (w, r.stdout[-3000:])
    assert not os.path.exists(f"{tmp_path}/run")


def test_report_of_an_imported_teacher_counts_no_training_tokens(tmp_path):
    """A teacher imported from a Hugging Face directory has an import-hf marker (no train.*):
    its row has no token count, and the report is written (it raised KeyError: 'train')."""
    from minitron_mcore.pipeline import report

    marks = {
        "teacher": {
            "id": "teacher",
            "command": "import-hf",
            "config": {"load": "hf", "save": str(tmp_path / "teacher")},
            "metrics": {"command": "import-hf", "params": 1000},
        },
        "evaluate.teacher.distill": {
            "id": "evaluate.teacher.distill",
            "config": {"load": str(tmp_path / "teacher")},
            "metrics": {"model": "teacher", "corpus": "distill", "valid_loss": 2.0},
        },
    }
    facts = report._model_facts(None, "teacher", marks)
    assert "tokens" not in facts and facts["params"] is None


@pytest.mark.slow
def test_pipeline_from_a_qwen3_hf_teacher(tokenizer_dir, tmp_path):
    """Qwen3 end to end: a tiny Qwen3 trained here and exported to a Hugging Face directory is
    the pipeline's teacher (teacher=HF_DIR): imported, corrected, scored, pruned in width (heads
    too) and depth, distilled, evaluated, exported; transformers loads every export."""
    from transformers import AutoModelForCausalLM

    base, hf, out = str(tmp_path / "base"), str(tmp_path / "hf"), str(tmp_path / "run")
    train = [a.replace("pretrain.", "", 1) for a in TINY if a.startswith("pretrain.train.")]
    minitron(
        "pretrain",
        "model=tiny-qwen3",
        f"tokenizer={tokenizer_dir}",
        f"save={base}",
        "data.train=[demo:stdlib-code]",
        f"data.cache_dir={tmp_path}/cache",
        "train.lr=3e-3",
        *train,
    )
    minitron("export-hf", f"load={base}", f"save={hf}")
    _pipeline(
        out, f"teacher={hf}", "correct.original_lr=3e-3", "students.0.target.num_attention_heads=2"
    )
    marks = {f[:-5] for f in os.listdir(os.path.join(out, "stages")) if f.endswith(".json")}
    assert {"teacher", "distill.width", "distill.depth", "export.width", "export.depth"} <= marks
    text = open(os.path.join(out, "report.md")).read()
    assert "`width.distilled`" in text and "`depth.distilled`" in text
    for name, layers, heads in (("teacher", 4, 4), ("width", 4, 2), ("depth", 2, 4)):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf", name))
        c = model.config
        assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == (
            "qwen3",
            layers,
            heads,
            32,
        )
        norms = [
            n for n, _ in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))
        ]
        assert len(norms) == 2 * layers


@pytest.mark.slow
def test_pipeline_from_a_qwen3_moe_hf_teacher(tokenizer_dir, tmp_path):
    """A mixture of experts end to end at expert-parallel size 2 (2 processes): a tiny Qwen3-MoE
    trained here and exported is the teacher (teacher=HF_DIR); one student keeps half the
    experts, one is pruned in width (hidden size and every expert's FFN); both are distilled,
    evaluated and exported, and transformers loads each export with its pruned shape."""
    from transformers import AutoModelForCausalLM

    base, hf, out = str(tmp_path / "base"), str(tmp_path / "hf"), str(tmp_path / "run")
    train = [a.replace("pretrain.", "", 1) for a in TINY if a.startswith("pretrain.train.")]
    minitron(
        "pretrain",
        "model=tiny-qwen3-moe",
        "model.num_moe_experts=4",
        f"tokenizer={tokenizer_dir}",
        f"save={base}",
        "data.train=[demo:stdlib-code]",
        f"data.cache_dir={tmp_path}/cache",
        "train.lr=3e-3",
        *train,
    )
    minitron("export-hf", f"load={base}", f"save={hf}")
    minitron(
        "pipeline",
        f"run_dir={out}",
        *[a for a in TINY if not a.startswith("students.")],
        f"teacher={hf}",
        "correct.original_lr=3e-3",
        "parallel.ep=2",
        "students.0.name=width",
        "students.0.target.hidden_size=48",
        "students.0.target.ffn_hidden_size=null",  # (the default width student's)
        "students.0.target.moe_ffn_hidden_size=16",
        "students.1.name=experts",
        "students.1.target.num_layers=null",
        "students.1.target.num_moe_experts=2",
        nproc=2,
    )
    text = open(os.path.join(out, "report.md")).read()
    assert "`width.distilled`" in text and "`experts.distilled`" in text
    for name, hidden, experts, width in (
        ("teacher", 64, 4, 32),
        ("width", 48, 4, 16),
        ("experts", 64, 2, 32),
    ):
        c = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf", name)).config
        assert (c.model_type, c.hidden_size, c.num_experts, c.moe_intermediate_size) == (
            "qwen3_moe",
            hidden,
            experts,
            width,
        ), name


def test_export_step_under_several_processes(llama_ckpt, tmp_path):
    """The pipeline's export runs on rank 0 while the other ranks wait: it made a collective
    call (the already-complete check) that paired with the waiting ranks' and left them with
    no metrics (every pipeline launched with torchrun failed at its first export). Both ranks
    get rank 0's metrics, also when the export is already complete."""
    out = str(tmp_path / "m")
    launch(
        [os.path.join(WORKERS, "export_step.py"), llama_ckpt, str(tmp_path / "hf"), out], nproc=2
    )
    got = [json.load(open(f"{out}.rank{r}.json")) for r in (0, 1)]
    assert got[0] == got[1]
    assert got[0]["first"]["command"] == "export-hf" and got[0]["first"]["gen_tokens_per_s"] > 0
    assert got[0]["again"]["skipped"] == "already complete"


@pytest.mark.slow  # (recipes' dry runs run in CI: test_recipes_dry_run)
def test_moe_recipe_dry_run(tokenizer_dir, tmp_path):
    """The Qwen3-30B-A3B recipe composes and dry-runs against a tiny Qwen3-MoE teacher (its
    targets and EP scaled down): an expert-pruned and a width-pruned student, the paper-style
    budgets; nothing is written."""
    from minitron_mcore.testing.hf_models import make_hf_model

    hf = make_hf_model("qwen3_moe", str(tmp_path / "hf"), seed=3, tokenizer_dir=tokenizer_dir)
    r = minitron(
        "pipeline",
        "+recipe=qwen3-30b-a3b-experts",
        f"run_dir={tmp_path}/run",
        f"teacher={hf}",
        "pipeline.dry_run=true",
        "parallel.ep=1",
        "students.0.target.num_moe_experts=2",
        "students.1.target.hidden_size=48",
        "students.1.target.moe_ffn_hidden_size=16",
        "importance.seq_length=64",
        "evaluate.seq_length=64",
    )
    for want in (
        "prune.target.num_moe_experts=2",
        "prune.target.hidden_size=48 prune.target.moe_ffn_hidden_size=16",
        "[distill.experts]  # 94.00B training tokens",
        "importance.layer_loss_samples=0",
    ):
        assert want in r.stdout, (want, r.stdout[-3000:])
    assert not os.path.exists(f"{tmp_path}/run")
    bad = minitron(
        "pipeline",
        "+recipe=qwen3-30b-a3b-experts",
        f"run_dir={tmp_path}/run",
        f"teacher={hf}",
        "pipeline.dry_run=true",
        check=False,
    )
    assert bad.returncode == 2 and "parallel.ep=8 does not divide num_moe_experts=4" in bad.stderr


def test_offline_logits_dry_run(tmp_path):
    """pipeline.offline_logits=true: one teacher-logits step over the distillation data, with the
    students' train keys, before the students; every distill step reads it."""
    r = _pipeline(
        str(tmp_path / "run"),
        "pipeline.dry_run=true",
        "pipeline.offline_logits=true",
        "pipeline.offline_top_k=16",
    )
    out = r.stdout
    assert out.count("minitron teacher-logits ") == 1
    first = out.index("[teacher-logits]")
    assert first < out.index("[prune.width]") and first < out.index("[distill.width]")
    line = out[first:].splitlines()[1]
    for want in (
        "distill.top_k=16",
        "train.steps=40",
        "train.global_batch_size=8",
        "train.seq_length=64",
    ):
        assert want in line, (want, line)
    assert out.count(f"teacher_logits={tmp_path}/run/teacher-logits") == 2
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_pipeline_with_offline_logits(tmp_path):
    """The tiny pipeline with its students distilled from stored teacher predictions: the
    teacher-logits step runs once, both students train from it and are evaluated, exported
    and reported."""
    out = str(tmp_path / "run")
    _pipeline(out, "pipeline.offline_logits=true", "pipeline.offline_top_k=16")
    marks = {f[:-5] for f in os.listdir(os.path.join(out, "stages")) if f.endswith(".json")}
    assert {"teacher-logits", "distill.width", "distill.depth", "export.width"} <= marks
    for name in ("width", "depth"):
        m = _marker(out, f"distill.{name}")["metrics"]
        assert m["teacher_logits"] == os.path.join(out, "teacher-logits")
    assert "`width.distilled`" in open(os.path.join(out, "report.md")).read()
