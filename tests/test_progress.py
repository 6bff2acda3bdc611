"""``utils.log.progress``: a tqdm bar on a terminal, ETA log lines a minute apart otherwise.

Off a terminal (torchrun, SLURM, ``| tee``) a bar is invisible, and a 30-layer model's
layer-removal passes once ran silent for more than 30 minutes; every long loop goes through
``progress``, which logs there instead (issue 16, point 7).
"""

from __future__ import annotations

import io
import re
import sys

import pytest
from tqdm import tqdm

from minitron_mcore.utils import log
from minitron_mcore.utils.log import LogProgress, progress


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(err: str, desc: str) -> list[str]:
    """The progress lines of ``desc`` in captured stderr, without the logger's time prefix."""
    found = (
        re.search(re.escape(desc) + r": \d+(/\d+ \(\d+%\)| \S+),.*", x) for x in err.splitlines()
    )
    return [m.group(0) for m in found if m]


@pytest.fixture(autouse=True)
def off_a_terminal(monkeypatch):
    monkeypatch.delenv("MINITRON_PROGRESS", raising=False)
    monkeypatch.delenv("MINITRON_PROGRESS_INTERVAL", raising=False)
    monkeypatch.setattr(log, "rank", lambda: 0)


def test_lines_at_first_item_every_interval_and_end_with_eta(capsys):
    clock = FakeClock()
    for _ in LogProgress(range(51), "calibration", 51, interval=60, clock=clock):
        clock.now += 3.0  # each item takes 3 s: a line at items 1, 21 (63 s later), 41, end
    assert lines(capsys.readouterr().err, "calibration") == [
        "calibration: 1/51 (2%), 3.00s/it, ETA 02:30",
        "calibration: 21/51 (41%), 3.00s/it, ETA 01:30",
        "calibration: 41/51 (80%), 3.00s/it, ETA 00:30",
        "calibration: 51/51 (100%), 3.00s/it, total 02:33",
    ]


def test_without_total_count_rate_and_elapsed_no_eta(capsys):
    clock = FakeClock()
    bar = LogProgress((d for d in "abc"), "preprocess", None, interval=0, unit="doc", clock=clock)
    bar.set_postfix_str("1.20K tokens")
    for _ in bar:
        clock.now += 0.5
    bar.close()  # callers close after iterating too: still one end line
    assert lines(capsys.readouterr().err, "preprocess") == [
        "preprocess: 1 doc, 2.00doc/s, 1.20K tokens, elapsed 00:00",
        "preprocess: 2 doc, 2.00doc/s, 1.20K tokens, elapsed 00:01",
        "preprocess: 3 doc, 2.00doc/s, 1.20K tokens, elapsed 00:01",
        "preprocess: 3 doc, 2.00doc/s, total 00:01",
    ]


def test_manual_updates_and_an_empty_loop(capsys):
    """``update(n)`` as the lm-eval adapter and the layer-removal passes use it; a loop with
    nothing to do logs nothing."""
    clock = FakeClock()
    bar = LogProgress(None, "lm-eval loglikelihood", 100, interval=60, clock=clock)
    for _ in range(10):
        clock.now += 10.0
        bar.update(10)
    bar.close()
    LogProgress([], "empty", 0, clock=clock).close()
    assert lines(capsys.readouterr().err, "lm-eval loglikelihood") == [
        "lm-eval loglikelihood: 10/100 (10%), 1.00it/s, ETA 01:30",
        "lm-eval loglikelihood: 70/100 (70%), 1.00it/s, ETA 00:30",
        "lm-eval loglikelihood: 100/100 (100%), 1.00it/s, total 01:40",
    ]


def test_off_a_terminal_progress_logs_with_the_env_interval(capsys, monkeypatch):
    monkeypatch.setenv("MINITRON_PROGRESS_INTERVAL", "5")
    bar = progress(range(3), "export-hf", unit="layer")
    assert isinstance(bar, LogProgress) and bar.interval == 5.0 and bar.total == 3
    assert list(bar) == [0, 1, 2]
    assert lines(capsys.readouterr().err, "export-hf")[0].startswith("export-hf: 1/3 (33%)")
    monkeypatch.setenv("MINITRON_PROGRESS_INTERVAL", "soon")
    assert progress(range(3), "x").interval == 60.0
    assert "MINITRON_PROGRESS_INTERVAL='soon'" in capsys.readouterr().err


def test_on_a_terminal_the_tqdm_bar(capsys, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress(range(4), "prune", unit="layer")
    assert isinstance(bar, tqdm) and not bar.disable
    assert list(bar) == [0, 1, 2, 3]
    assert "prune: 100%" in tty.getvalue() and "4/4" in tty.getvalue()


def test_minitron_progress_1_forces_the_bar_off_a_terminal(monkeypatch):
    monkeypatch.setenv("MINITRON_PROGRESS", "1")
    bar = progress(range(2), "calibration")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()


@pytest.mark.parametrize("rank, env, tty", [(1, "", False), (1, "1", True), (0, "0", True)])
def test_other_ranks_and_minitron_progress_0_are_silent(capsys, monkeypatch, rank, env, tty):
    monkeypatch.setattr(log, "rank", lambda: rank)
    monkeypatch.setenv("MINITRON_PROGRESS", env)
    monkeypatch.setenv("MINITRON_PROGRESS_INTERVAL", "0")
    if tty:
        monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress(range(3), "calibration")
    assert isinstance(bar, tqdm) and bar.disable
    assert list(bar) == [0, 1, 2]
    printed = sys.stderr.getvalue() if tty else capsys.readouterr().err
    assert printed == ""


def counting_forward_steps(monkeypatch):
    """Make importance's forward step write ``FORWARD`` to stderr, to see where the work is."""
    import functools

    from minitron_mcore.importance import command

    def lm_forward_step(vocab_size):
        real = command_lm_forward_step(vocab_size)

        @functools.wraps(real)
        def step(*args, **kwargs):
            sys.stderr.write("FORWARD\n")
            return real(*args, **kwargs)

        return step

    command_lm_forward_step = command.lm_forward_step
    monkeypatch.setattr(command, "lm_forward_step", lm_forward_step)


def test_importance_logs_calibration_and_layer_removal_progress(
    llama_ckpt, corpora, tmp_path, capsys, monkeypatch
):
    """The user's case: no terminal, so no bar. With interval 0, each calibration batch and
    each batch of every layer-removal pass logs a line with its ETA right after its forward
    pass (the progress follows the work, not the batch building), and each loop an end line."""
    from minitron_mcore.cli import main

    monkeypatch.setenv("MINITRON_PROGRESS_INTERVAL", "0")
    counting_forward_steps(monkeypatch)
    code = main(
        [
            "importance",
            f"load={llama_ckpt}",
            f"save={tmp_path}/scores",
            f"data.train=[{corpora['stdlib-code']}]",
            f"data.cache_dir={tmp_path}/cache",
            "importance.num_samples=4",
            "importance.seq_length=32",
            "importance.micro_batch_size=2",
            "importance.layer_loss_samples=4",
            "importance.block_sizes=[1,2]",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    calib, removal = lines(err, "calibration"), lines(err, "layer-removal loss")
    eta = r", [\d.]+(s/it|it/s|s/batch|batch/s)(, .*)?, ETA \d\d:\d\d$"
    assert [re.sub(eta, "", x) for x in calib[:-1]] == [
        "calibration: 1/2 (50%)",
        "calibration: 2/2 (100%)",
    ]
    assert re.match(r"calibration: 2/2 \(100%\), [^,]+, total \d\d:\d\d$", calib[-1])
    # 4 layers: the full model, 4 blocks of 1 and 3 of 2 = 8 passes over 2 global batches
    assert len(removal) == 17 and all(re.search(eta, x) for x in removal[:-1])
    assert removal[0].startswith("layer-removal loss: 1/16 (6%)")
    assert "without layers 2..3" in removal[-2]
    assert re.match(r"layer-removal loss: 16/16 \(100%\), [^,]+, total \d\d:\d\d$", removal[-1])
    # F = a forward pass (one micro-batch per global batch here), P = a line, E = an end line
    events = "".join(
        "F" if x == "FORWARD" else "E" if "total" in x else "P"
        for x in err.splitlines()
        if x == "FORWARD" or lines(x, "calibration") or lines(x, "layer-removal loss")
    )
    assert events == "FP" * 2 + "E" + "FP" * 16 + "E"
