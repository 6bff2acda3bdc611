"""The training engine shared by pretrain, correct and distill."""

import signal

_SIGTERM = {"received": False}


def defer_sigterm() -> None:
    """Keep a SIGTERM that arrives before the training loop runs (start-up, loading) for the
    loop's first step, which then saves and exits 0 (train/loop.py), instead of dying with
    nothing saved."""
    signal.signal(signal.SIGTERM, lambda *_: _SIGTERM.update(received=True))


def sigterm_received() -> bool:
    return _SIGTERM["received"]
