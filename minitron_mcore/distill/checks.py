"""Checks that a teacher/student pair can be distilled, before any training step.

Each failure is one ``error:`` line naming the fix; a student that was not pruned from this
teacher only gets a warning (distilling into another architecture is legitimate).
"""

from __future__ import annotations

import math

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import log0


def check_tokenizers(student_tok, teacher_tok, student_arch, teacher_arch) -> None:
    """Same tokenizer (vocabulary fingerprint), whose ids both models' output layers cover
    (their sizes may differ: the KD loss runs over the tokenizer's vocabulary)."""
    require(
        student_tok.fingerprint() == teacher_tok.fingerprint(),
        f"the teacher's tokenizer ({teacher_tok.path}, fingerprint {teacher_tok.fingerprint()}) "
        f"differs from the student's ({student_tok.path}, {student_tok.fingerprint()}); logit "
        "distillation needs one vocabulary - distill from a teacher with the student's tokenizer",
    )
    for who, arch in (("student", student_arch), ("teacher", teacher_arch)):
        require(
            student_tok.vocab_size <= arch.vocab_size,
            f"the tokenizer has {student_tok.vocab_size} tokens but the {who}'s output layer "
            f"only {arch.vocab_size} rows; they do not belong together - use the {who} made "
            "for this tokenizer",
        )


def check_layout(student_arch, teacher_arch, tp: int, pp: int) -> None:
    """The student's TP/PP layout must split both models."""
    for who, arch in (("student", student_arch), ("teacher", teacher_arch)):
        try:
            arch.check_parallel(tp, pp)
        except MinitronError as e:
            raise MinitronError(f"{e} (the {who}; both models share the layout)") from e


def check_provenance(student_meta, teacher_meta, teacher_path: str) -> bool:
    """Warn when the student's prune plan names another source checkpoint."""
    plan = student_meta.prune_plan or {}
    source = plan.get("source_checkpoint_id")
    if source and source == teacher_meta.checkpoint_id:
        return True
    where = plan.get("source_checkpoint") or "no prune plan"
    log0(
        "warning: the student was not pruned from teacher=%s (its source: %s); distilling "
        "anyway - check that this is the teacher you meant",
        teacher_path,
        where,
    )
    return False


def check_teacher_loss(loss: float, vocab_size: int, teacher_path: str) -> None:
    """A teacher that really loaded predicts better than uniform: loss < log(V)."""
    bound = math.log(vocab_size)
    require(
        math.isfinite(loss) and loss < bound,
        f"the teacher's loss on the first validation batch is {loss:.4f}, not below "
        f"log(vocab)={bound:.4f}: teacher={teacher_path} looks untrained or mismatched with "
        "the data's tokenizer - check teacher= and data.*",
    )
