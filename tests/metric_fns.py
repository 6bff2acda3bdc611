"""A user-supplied layer metric for importance (used by test_importance_user_metric)."""

import torch


def mean_top_logit(model) -> float:
    """Higher when the model is more confident on a fixed batch (any scalar works)."""
    from minitron_mcore.models.forward import forward_logits

    tokens = torch.arange(64).reshape(2, 32) % 100
    logits = forward_logits(model, tokens, type("A", (), {"vocab_size": 100})())
    return float(logits.max(-1).values.mean()) if logits is not None else 0.0
