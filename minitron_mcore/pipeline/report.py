"""``report.md`` of a pipeline run: generated from the steps' done-markers (their metrics), the
training logs, the importance scores and the prune plans - nothing is re-measured here.

The table lists every model with its parameters, the tokens its stage used, its validation
loss / perplexity on the distillation data and on the teacher's original data, and the
generation speed of the exported ones (the papers' trade-off: width-pruned students are more
accurate, depth-pruned ones faster). Plots (matplotlib, PNG): training curves of correction and
each distillation, the students' validation loss against tokens, layer importance per layer,
and the kept fraction of each width axis.
"""

from __future__ import annotations

import math
import os

from minitron_mcore.pipeline.config import PipelineConfig
from minitron_mcore.pipeline.markers import read_failures, read_markers
from minitron_mcore.utils.log import human_count


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def _models(cfg: PipelineConfig, marks: dict) -> list[dict]:
    """One row per evaluated model, in pipeline order."""
    rows = {}
    for rec in marks.values():
        m = rec["metrics"]
        if rec["id"].startswith("evaluate."):
            row = rows.setdefault(m["model"], {"model": m["model"], "ckpt": rec["config"]["load"]})
            row[m["corpus"]] = m.get("valid_loss")
            for task, scores in (m.get("lm_eval") or {}).items():
                if "acc" in scores:
                    row.setdefault("tasks", {})[task] = scores["acc"]
    for name, row in rows.items():
        row.update(_model_facts(cfg, name, marks))
    order = ["teacher", "teacher-corrected"]
    for v in cfg.students:
        order += [f"{v.name}.pruned", f"{v.name}.distilled"]
    return [rows[n] for n in order if n in rows]


def _model_facts(cfg, name: str, marks: dict) -> dict:
    from minitron_mcore.checkpoint.megatron import read_meta

    facts = {}
    try:
        facts["params"] = read_meta(marks_load(marks, name)).arch.num_params()
    except Exception:  # noqa: BLE001 - a missing checkpoint leaves the cell empty
        facts["params"] = None
    stage = {"teacher": "teacher", "teacher-corrected": "correct"}.get(name)
    if name.endswith(".distilled"):
        stage = "distill." + name.split(".")[0]
    if name.endswith(".pruned"):
        stage = "importance"
    m = marks.get(stage, {}).get("metrics", {}) if stage else {}
    if m and stage == "importance":
        seq = marks[stage]["config"]["importance"]["seq_length"]
        facts["tokens"], facts["tokens_what"] = m.get("num_samples", 0) * seq, "calibration"
    elif m and "train" in marks[stage]["config"]:  # (an imported teacher trained nothing here)
        seq = marks[stage]["config"]["train"]["seq_length"]
        facts["tokens"] = m.get("step", 0) * m.get("global_batch_size", 0) * seq
        facts["tokens_what"] = {"teacher": "pretraining", "correct": "correction"}.get(
            stage, "distillation"
        )
    export = marks.get(
        "export.teacher" if name == "teacher-corrected" else f"export.{name.split('.')[0]}", {}
    )
    if export and (name == "teacher-corrected" or name.endswith(".distilled")):
        facts["gen"] = export["metrics"].get("gen_tokens_per_s")
    return facts


def marks_load(marks: dict, name: str) -> str:
    for rec in marks.values():
        if rec["id"].startswith("evaluate.") and rec["metrics"].get("model") == name:
            return rec["config"]["load"]
    raise KeyError(name)


def _table(rows: list[dict]) -> list[str]:
    tasks = sorted({t for r in rows for t in r.get("tasks", {})})
    out = [
        "| model | params | tokens (stage) | loss distill data | ppl | loss original data | "
        "ppl | generation tok/s |" + "".join(f" {t} acc |" for t in tasks),
        "|---|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for r in rows:
        tokens = (
            f"{human_count(r['tokens'])} ({r.get('tokens_what', '')})" if r.get("tokens") else "—"
        )
        cells = [
            f"`{r['model']}`",
            human_count(r["params"]) if r.get("params") else "—",
            tokens,
        ]
        for corpus in ("distill", "original"):
            loss = r.get(corpus)
            cells += [_fmt(loss), _fmt(math.exp(min(loss, 50)), 2) if loss is not None else "—"]
        cells.append(_fmt(r.get("gen"), 1))
        cells += [_fmt(r.get("tasks", {}).get(t), 3) for t in tasks]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_report(cfg: PipelineConfig, steps: list) -> dict:
    """Write ``report.md`` and ``plots/*.png`` (rank 0); returns the table as metrics.
    ``steps``: the run's plan, for the commands that reproduce each stage."""
    from minitron_mcore.parallel import fail_together
    from minitron_mcore.pipeline import plots

    marks = read_markers(cfg.run_dir)
    rows = _models(cfg, marks)

    def write():
        figs = plots.make_all(cfg, marks, os.path.join(cfg.run_dir, "plots"))
        text = _render(cfg, marks, rows, figs, steps)
        tmp = os.path.join(cfg.run_dir, "report.md.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(cfg.run_dir, "report.md"))

    fail_together(write, rank0_only=True)
    return {"command": "report", "models": rows}


def _render(cfg, marks: dict, rows: list[dict], figs: list[str], steps: list) -> str:
    from minitron_mcore.pipeline.commands import command_line

    lines = [
        "# Minitron pipeline report",
        "",
        f"Run directory: `{cfg.run_dir}`. Teacher: `{cfg.teacher or 'pretrained here'}`. "
        f"Original data: `{', '.join(map(str, cfg.data.original))}`; distillation data: "
        f"`{', '.join(map(str, cfg.data.distill))}`. Validation losses are mean next-token "
        "cross entropy (nats) on the held-out split of each corpus "
        f"({cfg.evaluate.iters} x {cfg.evaluate.global_batch_size} samples x "
        f"{cfg.evaluate.seq_length} tokens). Generation speed: greedy decoding of "
        f"{cfg.evaluate.generate_tokens} tokens, batch 1, stock `transformers`, on the exported "
        "model (the fastest of 3 rounds over 3 prompts). Paths under the directory the pipeline "
        "was started in are shown relative to it.",
        "",
        *_table(rows),
        "",
    ]
    failed = read_failures(cfg.run_dir)
    if failed:
        lines += [
            "**Failed student variants** (re-run the same command after fixing the cause):",
            "",
        ]
        lines += [f"- `{name}`: {why}" for name, why in sorted(failed.items())] + [""]
    for f in figs:
        lines += [f"![{os.path.basename(f)}](plots/{os.path.basename(f)})", ""]
    lines += ["## Reproduce each stage alone", "", "```bash"]
    for step in steps:
        if step.command:
            lines.append(f"# {step.id}")
            lines.append(command_line(step))
    lines += ["```", ""]
    return _relative_paths("\n".join(lines))


def _relative_paths(text: str) -> str:
    """Paths under the working directory, relative to it: the report (and its commands) stays
    valid when the project directory is moved or the report is shared, and names no machine."""
    cwd = os.getcwd().rstrip(os.sep) + os.sep
    return text.replace(cwd, "") if cwd != os.sep else text
