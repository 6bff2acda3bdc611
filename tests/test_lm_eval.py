"""lm-evaluation-harness on our checkpoints: the `minitron` lm-eval model scores the tiny Llama
the way lm-eval's own `hf` model scores its `export-hf` copy (log-likelihoods, rolling
log-likelihoods, greedy generation), and lm-eval runs offline on the example tasks through
`minitron evaluate` and through the `lm_eval_cli` wrapper."""

import glob
import json
import os

import pytest
from conftest import ROOT, launch, minitron

pytest.importorskip("lm_eval")

TASKS = os.path.join(ROOT, "examples", "lm_eval_tasks")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MAX_LENGTH = 48  # short, so that long requests are truncated / split into rolling windows


def test_length_batches_respect_rows_and_tokens():
    from minitron_mcore.evaluate.lm_eval_adapter import length_batches

    lengths = [100, 10, 60, 10, 30, 5000]
    order = sorted(range(6), key=lambda i: -lengths[i])
    batches = list(length_batches(order, lengths, batch_size=2, max_tokens=200))
    assert batches == [[5], [0, 2], [4, 1], [3]]  # an over-long row still gets a batch alone
    assert sum(batches, []) == order


@pytest.fixture(scope="module")
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def exported(llama_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lm_eval") / "hf")
    minitron("export-hf", f"load={llama_ckpt}", f"save={out}")
    return out


@pytest.fixture(scope="module")
def models(llama_ckpt, exported, offline):
    """(ours, lm-eval's hf) on the same weights, both fp32 and with the same max_length."""
    pytest.importorskip("accelerate")  # lm-eval's hf model imports it
    from lm_eval.api.registry import get_model

    import minitron_mcore.evaluate.lm_eval_adapter  # noqa: F401  registers `minitron`
    from minitron_mcore.parallel import shutdown

    ours = get_model("minitron")(load=llama_ckpt, dtype="fp32", batch_size=4, max_length=MAX_LENGTH)
    hf = get_model("hf")(
        pretrained=exported, dtype="float32", batch_size=3, max_length=MAX_LENGTH, device="cpu"
    )
    yield ours, hf
    shutdown()  # the adapter started a process group in this pytest process


def _task_requests(name: str, limit: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=TASKS, include_defaults=False)
    task = get_task_dict([name], tm)[name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihoods_match_lm_eval_hf_model(models):
    ours, hf = models
    reqs = _task_requests("minitron_stdlib_mc", limit=6) + _instances(
        "loglikelihood",
        [
            ("", "import os"),  # empty context: the prefix token stands in
            ("def f(x):", "\n    return x"),
            ("x = 1 ", "+ 2"),  # trailing space moves to the continuation
            ("a, " * 40, "b"),  # longer than max_length: truncated from the left
        ],
    )
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    print(f"max |loglikelihood difference| over {len(reqs)} requests: {diff:.3g}")
    assert diff <= 1e-4, list(zip(a, b))
    assert [x[1] for x in a] == [y[1] for y in b]  # is_greedy

    texts = [("import sys\nprint(sys.argv)\n",), ("for i in range(10):\n    print(i)\n" * 6,)]
    rolling = _instances("loglikelihood_rolling", texts)
    ra, rb = ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
    assert max(abs(x - y) for x, y in zip(ra, rb)) <= 1e-4, (ra, rb)


def test_greedy_generation_matches_lm_eval_hf_model(models):
    ours, hf = models
    reqs = _task_requests("minitron_stdlib_gen", limit=3) + _instances(
        "generate_until",
        [
            ("def read_file(path):", {"until": ["\n\n"], "max_gen_toks": 12}),
            ("class Config:", {"until": [], "max_gen_toks": 10}),
            ("import", {"until": ["\n\n"], "max_gen_toks": 12}),
        ],
    )
    a, b = ours.generate_until(reqs), hf.generate_until(reqs)
    assert a == b
    assert any(a)  # not all empty: something was generated


@pytest.mark.multiproc
def test_minitron_evaluate_runs_lm_eval_tasks_offline(llama_ckpt, tmp_path):
    """`minitron evaluate` without data: lm-eval only, on the example tasks, scores in the
    command's metrics JSON."""
    r = launch(
        [
            "-m",
            "minitron_mcore",
            "evaluate",
            f"load={llama_ckpt}",
            f"save={tmp_path}/eval",
            "lm_eval_tasks=[minitron_stdlib_mc,minitron_stdlib_gen]",
            f"lm_eval_include=[{TASKS}]",
            "lm_eval_limit=10",
        ],
        env=OFFLINE,
    )
    line = json.loads(r.stdout.strip().splitlines()[-1])
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f) == line
    scores = line["lm_eval"]
    assert 0.0 <= scores["minitron_stdlib_mc"]["acc"] <= 1.0
    assert 0.0 <= scores["minitron_stdlib_mc"]["acc_norm"] <= 1.0
    assert 0.0 <= scores["minitron_stdlib_gen"]["exact_match,strip"] <= 1.0
    assert "valid_loss" not in line


@pytest.mark.multiproc
def test_lm_eval_cli_knows_the_minitron_model(llama_ckpt, tmp_path):
    """lm-eval's own command line, through the wrapper that registers the model."""
    out = tmp_path / "out"
    launch(
        [
            "-m",
            "minitron_mcore.evaluate.lm_eval_cli",
            "--model",
            "minitron",
            "--model_args",
            f"load={llama_ckpt},dtype=fp32",
            "--tasks",
            "minitron_stdlib_mc",
            "--include_path",
            TASKS,
            "--limit",
            "5",
            "--batch_size",
            "8",
            "--output_path",
            str(out),
        ],
        env=OFFLINE,
    )
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        res = json.load(f)["results"]["minitron_stdlib_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0
