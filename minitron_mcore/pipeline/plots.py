"""The report's PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import os

from minitron_mcore.pipeline.markers import read_train_log


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(marks: dict, out: str):
    """Two panels against steps: the LM (cross-entropy) training loss of teacher correction and
    of each distilled student (monitoring), and the KD loss each distillation optimises (on
    its own scale: a few tenths of a nat, where the LM losses are around 3)."""
    runs = [(k, r) for k, r in marks.items() if k == "correct" or k.startswith("distill.")]
    if not runs:
        return None
    plt = _plt()
    fig, (lm_ax, kd_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, rec in runs:
        rows = read_train_log(rec["output"])
        if key == "correct":
            lm = [(x["step"], x["train/loss"]) for x in rows if "train/loss" in x]
        else:
            lm = [(x["step"], x["train/lm_loss"]) for x in rows if "train/lm_loss" in x]
            kd = [(x["step"], x["train/loss"]) for x in rows if "train/loss" in x]
            if kd:
                kd_ax.plot(*zip(*kd), label=key)
        if lm:
            lm_ax.plot(*zip(*lm), label=key, linewidth=1)
    lm_ax.set_title("LM loss (correction; students, monitored)")
    kd_ax.set_title("KD loss (what distillation optimises)")
    for ax in (lm_ax, kd_ax):
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats)")
        ax.legend(fontsize=7)
    fig.suptitle("Teacher correction and distillation")
    return _save(fig, out, "training_curves.png")


def students_valid(marks: dict, out: str):
    """Each student's validation LM loss against distillation tokens (vs the teacher's)."""
    runs = [(k, r) for k, r in marks.items() if k.startswith("distill.")]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    teacher = None
    for key, rec in runs:
        train = rec["config"]["train"]
        per_step = train["global_batch_size"] * train["seq_length"]
        rows = [x for x in read_train_log(rec["output"]) if "valid/lm_loss" in x]
        ax.plot(
            [x["step"] * per_step for x in rows],
            [x["valid/lm_loss"] for x in rows],
            "o-",
            label=key[8:],
        )
        teacher = rec["metrics"].get("teacher_valid_loss", teacher)
    if teacher is not None:
        ax.axhline(teacher, color="gray", ls=":", label="corrected teacher")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("validation LM loss (nats)")
    ax.set_title("Students during distillation")
    ax.legend(fontsize=8)
    return _save(fig, out, "students_valid.png")


def layer_importance(marks: dict, out: str):
    """LM loss without each layer, and block importance 1 - cos, per layer."""
    rec = marks.get("importance")
    if not rec:
        return None
    from minitron_mcore.importance.scores import Scores

    scores = Scores.load(rec["output"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if "layer_loss.block1" in scores.tensors:
        loss = scores.tensors["layer_loss.block1"].tolist()
        ax.bar(range(len(loss)), loss, color="tab:blue", label="LM loss without the layer")
        base = float(scores.tensors.get("base_loss", 0.0))
        ax.axhline(base, color="gray", ls=":", label="full model")
        ax.set_ylim(bottom=min(loss + [base]) * 0.95)
    ax2 = ax.twinx()
    bi = scores.tensors["layer_bi"].tolist()
    ax2.plot(range(len(bi)), bi, "o-", color="tab:red", label="block importance 1 - cos")
    ax.set_xlabel("layer")
    ax.set_ylabel("LM loss (nats)")
    ax2.set_ylabel("1 - cos(x_in, x_out)")
    ax.set_title("Layer importance (calibration data)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    return _save(fig, out, "layer_importance.png")


def kept_fraction(marks: dict, out: str):
    """Per student, the fraction of each axis the pruning kept."""
    from minitron_mcore.checkpoint.megatron import read_meta

    rows = []
    for key, rec in marks.items():
        if key.startswith("prune."):
            plan = read_meta(rec["output"]).prune_plan or {}
            src, dst = plan.get("source_arch", {}), read_meta(rec["output"]).arch.to_dict()
            axes = [
                "hidden_size",
                "ffn_hidden_size",
                "num_attention_heads",
                "num_query_groups",
                "num_layers",
            ]
            rows.append((key[6:], [dst[a] / src[a] if src.get(a) else 1.0 for a in axes]))
    if not rows:
        return None
    plt = _plt()
    labels = ["hidden", "ffn", "heads", "groups", "layers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, (name, fr) in enumerate(rows):
        ax.bar([j + i * width for j in range(len(labels))], fr, width, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction")
    ax.set_title("What each student keeps of the teacher")
    ax.legend(fontsize=8)
    return _save(fig, out, "kept_fraction.png")


def _save(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    fig.clf()
    return path


def make_all(cfg, marks: dict, out: str) -> list[str]:
    makers = (training_curves, students_valid, layer_importance, kept_fraction)
    return [p for p in (m(marks, out) for m in makers) if p]
