"""The bad-input catalogue (issue 11): every way a user can hand minitron something broken.

Each :class:`Case` prepares one bad input in its own temporary directory (from small shared
fixtures built once: a tokenizer, one tiny Hugging Face Llama, its imported checkpoint, one
tokenized corpus, importance scores, and a second model with another tokenizer), runs the real
CLI in fresh processes (under ``torchrun`` with ``nproc=2`` for a few cases), and expects

* a non-zero exit,
* exactly one line starting with ``error:`` on stderr (once, not once per rank), containing
  ``expect`` (the words that name the fix), and no Python traceback,
* every file under the protected paths byte-identical before and after (sha256).

``tests/reliability/test_catalogue.py`` runs each case as a pytest test; ``run_catalogue.py``
runs them all and writes the table in ``tests/reliability/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The shared fixtures' training-type settings: tiny, fp32, no validation.
TRAIN = [
    "train.steps=3",
    "train.lr=1e-3",
    "train.warmup_steps=1",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.seq_length=32",
    "train.eval_iters=0",
    "train.precision=fp32",
]


# ---------------------------------------------------------------------------- processes


def env() -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("MINITRON_FAULT")
    }
    e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONWARNINGS"] = "ignore"
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv: list[str], nproc: int = 1, extra_env: dict | None = None, timeout: int = 600):
    """``[torchrun --nproc-per-node N] python -m minitron_mcore argv...`` -> CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(_free_port()), "-m", "minitron_mcore", *argv]
    else:
        cmd = [sys.executable, "-m", "minitron_mcore", *argv]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=dict(env(), **(extra_env or {})),
        timeout=timeout,
        cwd=ROOT,
    )


def _check(r, what: str):
    if r.returncode != 0:
        raise RuntimeError(f"setting up {what} failed ({r.returncode}):\n{r.stderr[-3000:]}")


# ---------------------------------------------------------------------------- shared fixtures


class Shared:
    """Small inputs built once, lazily, under ``root`` (cases only read them; a case that damages
    one copies it first). Attribute access builds what is missing."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def get(self, name: str) -> str:
        path = self._path(name)
        if not os.path.exists(path + ".done"):
            getattr(self, "_build_" + name)(path)
            open(path + ".done", "w").close()
        return path

    # -- builders
    def _build_tok(self, path):
        from minitron_mcore.testing.hf_models import make_tokenizer

        make_tokenizer(path)

    def _build_tok_small(self, path):
        from minitron_mcore.testing.hf_models import make_tokenizer

        make_tokenizer(path, vocab_size=384)

    def _build_hf(self, path):
        from minitron_mcore.testing.hf_models import make_hf_model

        make_hf_model("llama", path, seed=0, tokenizer_dir=self.get("tok"))

    def _build_hf_other(self, path):
        """Another model, with another tokenizer (vocabulary 384, not 512)."""
        from minitron_mcore.testing.hf_models import make_hf_model

        make_hf_model("llama", path, seed=1, tokenizer_dir=self.get("tok_small"))

    def _build_ckpt(self, path):
        _check(cli(["import-hf", f"load={self.get('hf')}", f"save={path}", "dtype=fp32"]), path)

    def _build_ckpt_other(self, path):
        r = cli(["import-hf", f"load={self.get('hf_other')}", f"save={path}", "dtype=fp32"])
        _check(r, path)

    def _build_corpus(self, path):
        from minitron_mcore.data.demo import write_demo
        from minitron_mcore.data.preprocess import iter_documents, write_indexed

        src = write_demo("stdlib-code", path + ".src", max_docs=20)
        write_indexed(iter_documents([src], "text", "file"), self.get("tok"), path, workers=1)

    def _build_scores(self, path):
        r = cli(
            [
                "importance",
                f"load={self.get('ckpt')}",
                f"save={path}",
                f"data.train=[{self.get('corpus')}]",
                "importance.num_samples=4",
                "importance.seq_length=32",
                "importance.layer_loss_samples=4",
            ]
        )
        _check(r, path)


# ---------------------------------------------------------------------------- cases


@dataclass
class Ctx:
    """What a case's functions see: the shared fixtures, its own work dir ``w``."""

    shared: Shared
    w: str
    vars: dict = field(default_factory=dict)

    def __getattr__(self, name):  # ctx.ckpt -> the shared checkpoint (built on first use)
        if name in ("shared", "w", "vars"):
            raise AttributeError(name)
        if name in self.vars:
            return self.vars[name]
        return self.shared.get(name)

    def copy(self, name: str, dst: str | None = None) -> str:
        """A private copy of a shared fixture (a directory, or a ``.bin/.idx`` prefix)."""
        src = self.shared.get(name)
        dst = os.path.join(self.w, dst or name)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            for ext in (".bin", ".idx"):
                shutil.copy2(src + ext, dst + ext)
        return dst

    def existing(self, name: str = "existing") -> str:
        """An existing output directory holding a file, to check it stays as it was."""
        d = os.path.join(self.w, name)
        os.makedirs(d)
        with open(os.path.join(d, "keep.txt"), "w") as f:
            f.write("precious")
        return d


@dataclass
class Case:
    id: str
    what: str
    argv: Callable[[Ctx], list[str]]
    expect: str
    """Substring of the ``error:`` line (the words naming the fix)."""
    prepare: Callable[[Ctx], None] | None = None
    protect: Callable[[Ctx], list[str]] = lambda c: []
    """Paths (files or directories) whose every file must keep its sha256."""
    nproc: int = 1
    slow: bool = False
    env: dict = field(default_factory=dict)
    after: Callable[[Ctx], str | None] | None = None
    """An extra check after the run: returns a problem description, or None."""
    cleanup: Callable[[Ctx], None] | None = None
    xfail: str = ""
    """A known defect not fixed yet (the reason)."""


def _edit_json(path: str, fn) -> None:
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def _hf_with(ctx: Ctx, fn, name: str = "hf_bad") -> None:
    """A copy of the HF model with its config.json edited by ``fn``."""
    ctx.vars[name] = ctx.copy("hf", name)
    _edit_json(os.path.join(ctx.vars[name], "config.json"), fn)


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _clobber(path: str, n: int = 64) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * n)


def _ckpt_version(ckpt: str) -> str:
    from minitron_mcore.checkpoint.megatron import resolve_checkpoint

    return resolve_checkpoint(ckpt)


def _distcp_files(ckpt: str) -> list[str]:
    d = os.path.join(_ckpt_version(ckpt), "weights")
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".distcp")]


def _import(load="{hf_bad}", save="{w}/out", *extra) -> Callable[[Ctx], list[str]]:
    return _fmt(["import-hf", f"load={load}", f"save={save}", *extra])


def _fmt(argv: list[str]) -> Callable[[Ctx], list[str]]:
    """argv with ``{name}`` placeholders filled from the context (fixtures, vars, ``w``)."""

    class _Lookup(dict):
        def __init__(self, ctx):
            self.ctx = ctx

        def __missing__(self, key):
            if key == "w":
                return self.ctx.w
            return self.ctx.vars[key] if key in self.ctx.vars else self.ctx.shared.get(key)

    return lambda ctx: [a.format_map(_Lookup(ctx)) for a in argv]


def _paths(*names: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: _fmt(list(names))(ctx)


def _correct(load="{ckpt}", data="{corpus}", save="{w}/run", *extra) -> Callable:
    return _fmt(["correct", f"load={load}", f"save={save}", f"data.train=[{data}]", *TRAIN, *extra])


def _evaluate(load="{ckpt}", data="{corpus}", *extra) -> Callable:
    return _fmt(
        ["evaluate", f"load={load}", f"data.valid=[{data}]", "iters=1", "seq_length=32"]
        + list(extra)
    )


def _prune(scores="{scores}", *target, load="{ckpt}") -> Callable:
    return _fmt(["prune", f"load={load}", f"scores={scores}", "save={w}/pruned", *target])


def _no_partials(c: Ctx) -> str | None:
    """A failed save leaves no half-written directory beside its target."""
    import glob

    left = glob.glob(os.path.join(c.w, "*partial*"))
    return f"left behind: {left}" if left else None


def _no_dir(path_tmpl: str) -> Callable[[Ctx], str | None]:
    def check(ctx):
        p = _fmt([path_tmpl])(ctx)[0]
        return f"{p} was created" if os.path.exists(p) else None

    return check


# --- preparations ----------------------------------------------------------------------------


def _prep_model_type(t):
    return lambda c: _hf_with(c, lambda d: d.update(model_type=t))


def _prep_drop_field(key):
    return lambda c: _hf_with(c, lambda d: d.pop(key))


def _prep_corrupt_header(c):
    c.vars["hf_bad"] = c.copy("hf", "hf_bad")
    _clobber(os.path.join(c.vars["hf_bad"], "model.safetensors"))


def _prep_truncated_st(c):
    c.vars["hf_bad"] = c.copy("hf", "hf_bad")
    p = os.path.join(c.vars["hf_bad"], "model.safetensors")
    _truncate(p, os.path.getsize(p) // 2)


def _prep_nan_weights(c):
    import torch
    from safetensors.torch import load_file, save_file

    c.vars["hf_bad"] = c.copy("hf", "hf_bad")
    p = os.path.join(c.vars["hf_bad"], "model.safetensors")
    t = load_file(p)
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    t["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file({k: v.contiguous() for k, v in t.items()}, p, metadata={"format": "pt"})
    del torch


def _prep_no_tokenizer(c):
    from minitron_mcore.checkpoint.hf_io import tokenizer_files

    c.vars["hf_bad"] = c.copy("hf", "hf_bad")
    for f in tokenizer_files(c.vars["hf_bad"]):
        os.remove(f)


def _prep_bad_ckpt(fn):
    def prep(c):
        c.vars["bad"] = c.copy("ckpt", "bad")
        fn(c, c.vars["bad"])
        c.existing()

    return prep


def _trunc_distcp(c, ckpt):
    for p in _distcp_files(ckpt):
        _truncate(p, 100)


def _no_metadata(c, ckpt):
    os.remove(os.path.join(_ckpt_version(ckpt), "weights", ".metadata"))


def _trunc_meta(c, ckpt):
    p = os.path.join(_ckpt_version(ckpt), "minitron.json")
    _truncate(p, os.path.getsize(p) // 2)


def _trunc_tracker(c, ckpt):
    p = os.path.join(ckpt, "minitron.json")
    _truncate(p, os.path.getsize(p) // 2)


def _nan_in_ckpt(c, ckpt):
    """A Megatron checkpoint whose final-norm weights are NaN: the tensor's bytes are found in
    the .distcp files and overwritten in place (what a bad write or a diverged save leaves)."""
    import torch

    from minitron_mcore.checkpoint.megatron import WeightsReader

    key = "decoder.final_layernorm.weight"
    t = WeightsReader(ckpt).read([key])[key].float().contiguous()
    raw = t.numpy().tobytes()
    nan = torch.full_like(t, float("nan")).numpy().tobytes()
    for p in _distcp_files(ckpt):
        data = open(p, "rb").read()
        at = data.find(raw)
        if at >= 0:
            open(p, "wb").write(data[:at] + nan + data[at + len(raw) :])
            return
    raise RuntimeError(f"{key} not found in the .distcp files of {ckpt}")


def _prep_data(fn):
    def prep(c):
        c.vars["data"] = fn(c)

    return prep


def _empty_data(c):
    from minitron_mcore.data.preprocess import write_indexed

    p = os.path.join(c.w, "empty")
    try:
        write_indexed(iter([]), c.tok, p, workers=1)
    except Exception:
        pass
    if not os.path.exists(p + ".bin"):  # the writer refuses: write an empty dataset directly
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        b = IndexedDatasetBuilder(p + ".bin", dtype=np.int32)
        b.finalize(p + ".idx")
    return p


def _short_data(c):
    from minitron_mcore.data.preprocess import write_indexed

    p = os.path.join(c.w, "short")
    write_indexed(iter(["def f(): pass"]), c.tok, p, workers=1)
    return p


def _trunc_bin(c):
    p = c.copy("corpus", "trunc")
    _truncate(p + ".bin", os.path.getsize(p + ".bin") // 3)
    return p


def _garbage_idx(c):
    p = c.copy("corpus", "garbled")
    _clobber(p + ".idx", 32)
    return p


def _empty_jsonl(c):
    p = os.path.join(c.w, "empty.jsonl")
    open(p, "w").close()
    return p


def _other_tok_data(c):
    from minitron_mcore.data.demo import write_demo
    from minitron_mcore.data.preprocess import iter_documents, write_indexed

    src = write_demo("stdlib-docs", os.path.join(c.w, "src"), max_docs=5)
    p = os.path.join(c.w, "other_tok")
    write_indexed(iter_documents([src], "text", "file"), c.tok_small, p, workers=1)
    return p


def _fake_scores_other(c):
    """Real scores of another checkpoint: the shared scores' file with the provenance of the
    other model (what `importance` on ckpt_other writes there)."""
    from minitron_mcore.checkpoint.megatron import read_meta

    d = os.path.join(c.w, "scores_other")
    shutil.copytree(c.scores, d)
    meta = read_meta(c.ckpt_other)
    _edit_json(
        os.path.join(d, "scores.json"),
        lambda s: s.update(
            checkpoint=c.ckpt_other, checkpoint_id=meta.checkpoint_id, arch=meta.arch.to_dict()
        ),
    )
    c.vars["scores_other"] = d


def _corrupt_scores(c):
    d = os.path.join(c.w, "scores_bad")
    shutil.copytree(c.scores, d)
    _truncate(os.path.join(d, "scores.safetensors"), 50)
    c.vars["scores_bad"] = d


def _read_only(c):
    d = os.path.join(c.w, "readonly")
    os.makedirs(d)
    r = subprocess.run(["chattr", "+i", d], capture_output=True)
    if r.returncode != 0:
        os.chmod(d, 0o555)  # enough when not root
    c.vars["ro"] = d


def _read_only_cleanup(c):
    subprocess.run(["chattr", "-i", c.vars.get("ro", "")], capture_output=True)


def _trained_then_nan(c):
    c.vars["run"] = os.path.join(c.w, "run")


def _last_good_checkpoint(c) -> str | None:
    """The NaN-loss run must leave a checkpoint of its last good step (step 1)."""
    from minitron_mcore.checkpoint.megatron import read_meta

    run = c.vars["run"]
    try:
        meta = read_meta(run)
    except Exception as e:  # noqa: BLE001
        return f"no loadable checkpoint at {run} ({e})"
    it = (meta.train_state or {}).get("iteration")
    return None if it == 1 else f"checkpoint at {run} is of step {it}, expected 1"


def _setup_existing_export(c):
    c.existing("export")


CASES: list[Case] = [
    # ------------------------------------------------------------------ configuration
    Case(
        "unknown-key",
        "a misspelt top-level group (`trian.steps`)",
        _correct("{ckpt}", "{corpus}", "{w}/run", "trian.steps=2"),
        "unknown key 'trian.steps'",
    ),
    Case(
        "unknown-nested-key",
        "a misspelt nested key (`prune.target.hiden_size`)",
        _fmt(["prune", "load={w}/x", "save={w}/y", "prune.target.hiden_size=32"]),
        "unknown key 'prune.target.hiden_size'",
    ),
    Case(
        "mistyped-value",
        "a value of the wrong type (`parallel.tp=two`)",
        _fmt(["import-hf", "load={w}/x", "save={w}/y", "parallel.tp=two"]),
        "parallel.tp=two",
    ),
    Case(
        "unknown-command",
        "a command that does not exist",
        _fmt(["prune-everything"]),
        "minitron --help",
    ),
    Case(
        "bad-choice",
        "a value outside a key's choices (`prune.depth_metric=random`)",
        _prune("{scores}", "prune.target.num_layers=2", "prune.depth_metric=random"),
        "prune.depth_metric",
        protect=_paths("{ckpt}", "{scores}"),
        after=_no_dir("{w}/pruned"),
    ),
    Case(
        "warmup-not-below-steps",
        "train.warmup_steps >= train.steps",
        _correct("{ckpt}", "{corpus}", "{w}/run", "train.warmup_steps=5"),
        "train.warmup_steps=5 must be below",
        after=_no_dir("{w}/run"),
    ),
    Case(
        "seq-longer-than-model",
        "train.seq_length beyond the model's positions",
        _correct("{ckpt}", "{corpus}", "{w}/run", "train.seq_length=100000"),
        "use a shorter train.seq_length",
        after=_no_dir("{w}/run"),
    ),
    # ------------------------------------------------------------------ prune
    Case(
        "prune-hidden-grows",
        "a width target larger than the model (hidden 64 -> 128)",
        _prune("{scores}", "prune.target.hidden_size=128"),
        "prune.target.hidden_size=128",
        protect=_paths("{ckpt}", "{scores}"),
        after=_no_dir("{w}/pruned"),
    ),
    Case(
        "prune-heads-not-per-group",
        "a head target that is not a multiple of the query groups (4 heads, 2 groups -> 3)",
        _prune("{scores}", "prune.target.num_attention_heads=3"),
        "prune.target.num_attention_heads=3",
        protect=_paths("{ckpt}", "{scores}"),
    ),
    Case(
        "prune-ffn-zero",
        "an FFN target of zero",
        _prune("{scores}", "prune.target.ffn_hidden_size=0"),
        "prune.target.ffn_hidden_size",
        protect=_paths("{ckpt}", "{scores}"),
    ),
    Case(
        "prune-too-many-layers",
        "a depth target above the layer count (4 -> 6)",
        _prune("{scores}", "prune.target.num_layers=6"),
        "prune.target.num_layers=6",
        protect=_paths("{ckpt}", "{scores}"),
    ),
    Case(
        "prune-drop-missing-layer",
        "prune.drop_layers names a layer the model does not have",
        _prune("", "prune.drop_layers=[7]"),
        "prune.drop_layers",
        protect=_paths("{ckpt}"),
    ),
    Case(
        "prune-pruned-tp",
        "a pruned model that parallel.tp does not divide (2 heads, 1 group at TP=2)",
        _prune("{scores}", "prune.target.num_query_groups=1", "parallel.tp=2"),
        "the pruned model",
        protect=_paths("{ckpt}", "{scores}"),
    ),
    Case(
        "prune-scores-of-another-model",
        "importance scores computed on a different checkpoint",
        _prune("{scores_other}", "prune.target.hidden_size=32"),
        "run `minitron importance load=",
        prepare=_fake_scores_other,
        protect=_paths("{ckpt}", "{scores_other}"),
    ),
    Case(
        "prune-scores-not-a-dir",
        "scores= pointing at something that is not a scores directory",
        _prune("{ckpt}", "prune.target.hidden_size=32"),
        "run `minitron importance load=CKPT save=SCORES` first",
        protect=_paths("{ckpt}"),
    ),
    Case(
        "prune-scores-corrupt",
        "a truncated scores.safetensors",
        _prune("{scores_bad}", "prune.target.hidden_size=32"),
        "re-run importance",
        prepare=_corrupt_scores,
        protect=_paths("{ckpt}"),
    ),
    # ------------------------------------------------------------------ Hugging Face import
    Case(
        "hf-unsupported-model-type",
        "an HF model_type minitron does not map (gpt2)",
        _import(),
        "'gpt2' is not supported",
        prepare=_prep_model_type("gpt2"),
    ),
    Case(
        "hf-moe-model-type",
        "a mixture-of-experts family minitron does not map (model_type deepseek_v3)",
        _import(),
        "'deepseek_v3' is not supported",
        prepare=_prep_model_type("deepseek_v3"),
    ),
    Case(
        "hf-moe-fields",
        "MoE fields in a dense family's config (num_local_experts=8)",
        _import(),
        "mixture-of-experts",
        prepare=lambda c: _hf_with(
            c, lambda d: d.update(num_local_experts=8, num_experts_per_tok=2)
        ),
    ),
    Case(
        "hf-sliding-window",
        "Mistral sliding-window attention shorter than the context",
        _import(),
        "sliding-window attention",
        prepare=lambda c: _hf_with(
            c,
            lambda d: d.update(
                model_type="mistral", sliding_window=512, rope_scaling=None, rope_parameters=None
            ),
        ),
    ),
    Case(
        "hf-qwen2-sliding-window",
        "Qwen2 with use_sliding_window=true",
        _import(),
        "use_sliding_window=false",
        prepare=lambda c: _hf_with(
            c, lambda d: d.update(model_type="qwen2", use_sliding_window=True)
        ),
    ),
    Case(
        "hf-config-missing-field",
        "config.json without num_hidden_layers",
        _import(),
        "num_hidden_layers",
        prepare=_prep_drop_field("num_hidden_layers"),
    ),
    Case(
        "hf-config-not-json",
        "a truncated config.json",
        _import(),
        "is not valid JSON",
        prepare=lambda c: (
            _hf_with(c, lambda d: None),
            _truncate(os.path.join(c.vars["hf_bad"], "config.json"), 40),
        ),
    ),
    Case(
        "hf-safetensors-header",
        "a safetensors file with a garbage header",
        _import("{hf_bad}", "{existing}", "overwrite=true"),
        "corrupt safetensors file",
        prepare=lambda c: (_prep_corrupt_header(c), c.vars.update(existing=c.existing())),
        protect=_paths("{existing}"),
        after=_no_dir("{w}/existing.partial"),
    ),
    Case(
        "hf-safetensors-truncated",
        "a safetensors file cut in half (an interrupted download)",
        _import("{hf_bad}", "{existing}", "overwrite=true"),
        "re-download",
        prepare=lambda c: (_prep_truncated_st(c), c.vars.update(existing=c.existing())),
        protect=_paths("{existing}"),
    ),
    Case(
        "hf-nan-weights",
        "NaN and Inf values in the HF weights",
        _import(),
        "not finite",
        prepare=_prep_nan_weights,
        after=_no_dir("{w}/out"),
    ),
    Case(
        "hf-nan-weights-2ranks",
        "NaN and Inf values in the HF weights, imported by 2 ranks at TP=2",
        _import("{hf_bad}", "{w}/out", "parallel.tp=2"),
        "not finite",
        prepare=_prep_nan_weights,
        after=_no_dir("{w}/out"),
        nproc=2,
        slow=True,
    ),
    Case(
        "hf-no-tokenizer",
        "an HF directory without tokenizer files",
        _import(),
        "pass tokenizer=DIR",
        prepare=_prep_no_tokenizer,
    ),
    Case(
        "hf-tp-does-not-divide",
        "parallel.tp=3 for 4 heads / 2 groups",
        _import("{hf}", "{w}/out", "parallel.tp=3"),
        "parallel.tp=3 does not divide",
        protect=_paths("{hf}"),
    ),
    Case(
        "hf-pp-does-not-divide",
        "parallel.pp=3 for 4 layers",
        _import("{hf}", "{w}/out", "parallel.pp=3"),
        "parallel.pp=3 does not divide num_layers=4",
    ),
    Case(
        "world-not-multiple-of-tp-pp",
        "2 processes for parallel.pp=4 (tp*pp does not divide the world size)",
        _import("{hf}", "{w}/out", "parallel.pp=4"),
        "launch a multiple of tp*pp processes",
        nproc=2,
        slow=True,
        after=_no_dir("{w}/out"),
    ),
    Case(
        "output-exists",
        "save= an existing directory without overwrite=true",
        _import("{hf}", "{existing}"),
        "pass overwrite=true",
        prepare=lambda c: c.vars.update(existing=c.existing()),
        protect=_paths("{existing}"),
    ),
    Case(
        "output-read-only",
        "save= inside a read-only directory",
        _import("{hf}", "{ro}/ckpt"),
        "not writable",
        prepare=_read_only,
        cleanup=_read_only_cleanup,
        protect=_paths("{ro}"),
    ),
    Case(
        "nccl-without-gpu",
        "parallel.backend=nccl on a machine without a GPU (2 ranks)",
        _import("{hf}", "{w}/out", "parallel.backend=nccl"),
        "parallel.backend=gloo",
        nproc=2,
        after=_no_dir("{w}/out"),
    ),
    # ------------------------------------------------------------------ Megatron checkpoints
    Case(
        "ckpt-is-hf-dir",
        "load= an HF directory where a minitron checkpoint is expected",
        _fmt(["export-hf", "load={hf}", "save={w}/out"]),
        "minitron import-hf",
        protect=_paths("{hf}"),
    ),
    Case(
        "ckpt-missing",
        "load= a path that does not exist",
        _fmt(["export-hf", "load={w}/nope", "save={w}/out"]),
        "does not exist",
    ),
    Case(
        "ckpt-distcp-truncated",
        "DCP weight files cut short; the earlier export stays",
        _fmt(["export-hf", "load={bad}", "save={w}/existing", "overwrite=true"]),
        "corrupt or incomplete",
        prepare=_prep_bad_ckpt(_trunc_distcp),
        protect=_paths("{w}/existing"),
        after=_no_dir("{w}/existing.partial"),
    ),
    Case(
        "ckpt-distcp-truncated-2ranks",
        "DCP weight files cut short, read by 2 ranks (evaluate at TP=2)",
        _evaluate("{bad}", "{corpus}", "parallel.tp=2"),
        "corrupt or incomplete",
        prepare=_prep_bad_ckpt(_trunc_distcp),
        protect=_paths("{bad}"),
        nproc=2,
        slow=True,
    ),
    Case(
        "ckpt-no-dcp-metadata",
        "a checkpoint whose weights/.metadata is gone",
        _evaluate("{bad}"),
        "corrupt or incomplete",
        prepare=_prep_bad_ckpt(_no_metadata),
        protect=_paths("{bad}"),
    ),
    Case(
        "ckpt-minitron-json-truncated",
        "a truncated minitron.json sidecar",
        _fmt(["export-hf", "load={bad}", "save={w}/out"]),
        "re-create the checkpoint",
        prepare=_prep_bad_ckpt(_trunc_meta),
        protect=_paths("{bad}"),
    ),
    Case(
        "ckpt-tracker-truncated",
        "a truncated top-level minitron.json (the version tracker)",
        _fmt(["export-hf", "load={bad}", "save={w}/out"]),
        "corrupt",
        prepare=_prep_bad_ckpt(_trunc_tracker),
        protect=_paths("{bad}"),
    ),
    Case(
        "ckpt-nan-weights",
        "NaN in a Megatron checkpoint's weights, then training on it",
        _correct("{bad}", "{corpus}", "{w}/run"),
        "not finite",
        prepare=_prep_bad_ckpt(_nan_in_ckpt),
        protect=_paths("{bad}"),
        after=_no_dir("{w}/run"),
    ),
    # ------------------------------------------------------------------ data
    Case(
        "data-missing",
        "data.train naming a path that does not exist",
        _evaluate("{ckpt}", "{w}/nothing"),
        "nothing",
    ),
    Case(
        "data-empty-indexed",
        "an indexed dataset with no documents",
        _evaluate("{ckpt}", "{data}"),
        "data",
        prepare=_prep_data(_empty_data),
        protect=_paths("{ckpt}"),
    ),
    Case(
        "data-too-short",
        "a dataset shorter than one training sample",
        _correct("{ckpt}", "{data}", "{w}/run"),
        "data",
        prepare=_prep_data(_short_data),
        after=_no_dir("{w}/run"),
    ),
    Case(
        "data-bin-truncated",
        "a .bin cut to a third of its size (the .idx promises more)",
        _evaluate("{ckpt}", "{data}"),
        "re-create",
        prepare=_prep_data(_trunc_bin),
    ),
    Case(
        "data-idx-corrupt",
        "an .idx with a garbage header",
        _evaluate("{ckpt}", "{data}"),
        "re-create",
        prepare=_prep_data(_garbage_idx),
    ),
    Case(
        "data-empty-jsonl",
        "an empty JSONL file as training data",
        _correct("{ckpt}", "{data}", "{w}/run", "data.cache_dir={w}/cache"),
        "no documents",
        prepare=_prep_data(_empty_jsonl),
        after=_no_dir("{w}/run"),
        slow=True,
    ),
    Case(
        "data-other-tokenizer",
        "a dataset tokenized with another tokenizer than the model's",
        _correct("{ckpt}", "{data}", "{w}/run"),
        "tokenizer",
        prepare=_prep_data(_other_tok_data),
        after=_no_dir("{w}/run"),
    ),
    # ------------------------------------------------------------------ distillation
    Case(
        "distill-tokenizer-mismatch",
        "teacher and student with different tokenizers / vocabularies",
        _fmt(
            [
                "distill",
                "load={ckpt_other}",
                "teacher={ckpt}",
                "save={w}/run",
                "data.train=[{corpus}]",
                *TRAIN,
            ]
        ),
        "tokenizer",
        protect=_paths("{ckpt}", "{ckpt_other}"),
        after=_no_dir("{w}/run"),
    ),
    # ------------------------------------------------------------------ training failures
    Case(
        "nan-loss",
        "a loss that becomes non-finite at step 2 (lr 1e12): stop, save step 1 (no interval save)",
        _correct("{ckpt}", "{corpus}", "{run}", "train.lr=1e12", "train.warmup_steps=0"),
        "diverged at step 2",
        prepare=_trained_then_nan,
        protect=_paths("{ckpt}"),
        after=_last_good_checkpoint,
    ),
    Case(
        "nan-loss-2ranks",
        "the same divergence with 2 data-parallel ranks: one error line, step 1 saved",
        _correct("{ckpt}", "{corpus}", "{run}", "train.lr=1e12", "train.warmup_steps=0"),
        "diverged at step 2",
        prepare=_trained_then_nan,
        protect=_paths("{ckpt}"),
        after=_last_good_checkpoint,
        nproc=2,
        slow=True,
    ),
    Case(
        "disk-full-on-save",
        "ENOSPC while a checkpoint is written (simulated at the sidecar write)",
        _import("{hf}", "{existing}", "overwrite=true"),
        "no space left on device (simulated); free space there",
        prepare=lambda c: c.vars.update(existing=c.existing()),
        env={"MINITRON_FAULT_ENOSPC": "save:weights-written"},
        protect=_paths("{existing}"),
        after=_no_partials,
    ),
    Case(
        "disk-full-on-save-2ranks",
        "the same full disk with 2 ranks at TP=2",
        _import("{hf}", "{existing}", "overwrite=true", "parallel.tp=2"),
        "no space left on device (simulated); free space there",
        prepare=lambda c: c.vars.update(existing=c.existing()),
        env={"MINITRON_FAULT_ENOSPC": "save:weights-written"},
        protect=_paths("{existing}"),
        after=_no_partials,
        nproc=2,
        slow=True,
    ),
    # One rank's write fails while the other's succeeds: every rank must learn of it at once,
    # not wait at the next collective for the process-group timeout (bounded to 1 minute here,
    # so that a regression fails on the error text instead of hanging the run).
    Case(
        "disk-full-rank0-only-2ranks",
        "ENOSPC on rank 0 alone, at its sidecar write (the other rank's writes succeed)",
        _import(
            "{hf}", "{existing}", "overwrite=true", "parallel.tp=2", "parallel.timeout_minutes=1"
        ),
        "no space left on device (simulated); free space there",
        prepare=lambda c: c.vars.update(existing=c.existing()),
        env={"MINITRON_FAULT_ENOSPC": "save:sidecar-written", "MINITRON_FAULT_RANK": "0"},
        protect=_paths("{existing}"),
        after=_no_partials,
        nproc=2,
    ),
    Case(
        "disk-full-rank1-only-2ranks",
        "ENOSPC on rank 1 alone, after its shard of the weights",
        _import(
            "{hf}", "{existing}", "overwrite=true", "parallel.tp=2", "parallel.timeout_minutes=1"
        ),
        "no space left on device (simulated); free space there",
        prepare=lambda c: c.vars.update(existing=c.existing()),
        env={"MINITRON_FAULT_ENOSPC": "save:weights-written", "MINITRON_FAULT_RANK": "1"},
        protect=_paths("{existing}"),
        after=_no_partials,
        nproc=2,
        slow=True,
    ),
]


# ---------------------------------------------------------------------------- running


def tree_hashes(paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (a missing path hashes as absent)."""
    out = {}
    for p in paths:
        if os.path.isfile(p):
            files = [p]
        elif os.path.isdir(p):
            files = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        else:
            out[p] = "absent"
            continue
        for f in sorted(files):
            with open(f, "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()
        out[p + "/"] = str(sorted(files))
    return out


def has_traceback(stderr: str) -> bool:
    """A Python traceback from minitron's processes. torchrun's own report that a worker
    exited non-zero (a ChildFailedError traceback of the launcher, torch/distributed/run.py) is
    the launcher's behaviour for any failing worker and does not count."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            frames = "\n".join(lines[i + 1 : i + 8])
            if "torch/distributed/run.py" not in frames:
                return True
    return False


@dataclass
class Result:
    case: Case
    returncode: int
    errors: list[str]
    traceback: bool
    intact: bool
    problems: list[str]
    seconds: float
    stderr: str

    @property
    def seen(self) -> str:
        return self.errors[0][len("error: ") :] if self.errors else ""

    @property
    def ok(self) -> bool:
        return not self.problems


def run_case(case: Case, shared: Shared, work: str) -> Result:
    """Prepare, hash, run, hash again; every deviation from the contract is a problem."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ctx = Ctx(shared, work)
    t0 = time.time()
    try:
        if case.prepare:
            case.prepare(ctx)
        argv = case.argv(ctx)
        protected = case.protect(ctx)
        before = tree_hashes(protected)
        r = cli(argv, nproc=case.nproc, extra_env=case.env)
        after = tree_hashes(protected)
        problems = []
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        if r.returncode == 0:
            problems.append("exit code 0")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error: lines")
        if errors and case.expect not in errors[0]:
            problems.append(f"expected {case.expect!r} in the error line")
        tb = has_traceback(r.stderr)
        if tb:
            problems.append("a traceback was printed")
        intact = before == after
        if not intact:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"protected outputs changed: {changed[:3]}")
        if case.after:
            extra = case.after(ctx)
            if extra:
                problems.append(extra)
    finally:
        if case.cleanup:
            case.cleanup(ctx)
    return Result(case, r.returncode, errors, tb, intact, problems, time.time() - t0, r.stderr)


def case_ids(fast: bool = False) -> list[str]:
    return [c.id for c in CASES if not (fast and c.slow)]


BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"
