"""Compatibility layer: unmodified Megatron-Core on CPU + gloo when no GPU is present.

On a CUDA machine :func:`activate` does nothing, so GPU runs use Megatron exactly as shipped.
"""

import torch


def activate() -> bool:
    """Activate the CPU layer if CUDA is unavailable. Returns True if it is active."""
    if torch.cuda.is_available():
        return False
    from minitron_mcore.compat.cpu import activate_cpu_compat

    activate_cpu_compat()
    return True


def on_gpu() -> bool:
    return torch.cuda.is_available()
