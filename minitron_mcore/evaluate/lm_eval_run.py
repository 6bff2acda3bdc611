"""lm-evaluation-harness tasks inside ``minitron evaluate`` (``lm_eval_tasks=[...]``).

    minitron evaluate load=CKPT data.valid=[DATA] lm_eval_tasks=[hellaswag,arc_easy]
    minitron evaluate load=CKPT lm_eval_tasks=[minitron_stdlib_mc] \\
        lm_eval_include=[examples/lm_eval_tasks] lm_eval_limit=20

The model the command already loaded is wrapped in the ``minitron`` lm-eval model
(:mod:`.lm_eval_adapter`) and handed to ``lm_eval.simple_evaluate``; the scores land in the
command's metrics as ``"lm_eval": {task: {metric: value}}``. Task names are checked before the
model is loaded. Built-in tasks download their datasets from the Hugging Face Hub the first time
(lm-eval's doing); tasks in ``lm_eval_include`` directories can be fully local.
"""

from __future__ import annotations

import os

from minitron_mcore.errors import MinitronError, require

INSTALL_HINT = "lm_eval_tasks needs lm-eval: pip install -e .[eval] (or bash setup.sh)"


def task_manager(tasks: list[str], include: list[str]):
    """lm-eval's task index with the ``include`` directories; every name of ``tasks`` must be
    in it. Only the include directories are indexed when they hold every task (indexing lm-eval's
    thousands of built-in YAMLs takes ~20 s)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MinitronError(f"{INSTALL_HINT} ({e})") from e
    paths = [os.path.abspath(p) for p in include]
    for p in paths:
        require(os.path.isdir(p), f"lm_eval_include: {p} is not a directory of task YAMLs")
    tm = None
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if _unknown(tm, tasks):
            tm = None
    tm = tm or TaskManager(include_path=paths or None)
    missing = _unknown(tm, tasks)
    require(
        not missing,
        f"lm_eval_tasks: unknown task(s) {missing}; `lm_eval ls tasks` lists lm-eval's, and "
        "lm_eval_include=[DIR] adds a directory of task YAMLs",
    )
    return tm


def _unknown(tm, tasks: list[str]) -> list[str]:
    return [t for t in tasks if not tm.match_tasks([t])]


def task_scores(results: dict) -> dict:
    """lm-eval's ``results`` -> {task: {metric: value}}, numbers only; lm-eval's
    ``metric,filter`` keys keep their filter unless it is the default ``none``."""
    out = {}
    for task, res in results.get("results", {}).items():
        scores = {}
        for key, value in res.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, and stderrs lm-eval reports as "N/A"
            metric, _, filt = key.partition(",")
            scores[metric if filt in ("", "none") else key] = float(value)
        out[task] = scores
    return out


def run_lm_eval(lm, tm, tasks: list[str], limit=None, num_fewshot=None, seed: int = 1234) -> dict:
    """``simple_evaluate`` on ``lm`` (every rank runs it in lockstep: lm-eval sees one
    process); the scores of global rank 0 on every rank."""
    import lm_eval
    import torch.distributed as dist

    from minitron_mcore.parallel import comm_device

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=tm,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    box = [task_scores(out) if out else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]
