"""Collection rules of the GPU test set: ``python3 -m pytest -q -m gpu``.

Every test in this directory is a ``gpu`` test. Where torch sees no GPU each one is skipped,
with the reason, at collection - before any fixture starts a CLI process - so the set costs
nothing on a CPU machine. Tests that need two GPUs carry ``common.requires_gpus(2)``.

The fixtures are the CPU suite's: ``tests/conftest.py`` is a parent conftest (``tokenizer_dir``,
``hf_models``, ``corpora``, ``llama_ckpt``, ``tokens``, ``tokens_file`` ...), and the
distillation pair comes from ``tests/test_distill.py`` (``teacher``, ``student``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .common import no_gpu_reason

GPU_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    reason = no_gpu_reason(1)
    for item in items:
        if GPU_DIR not in Path(item.path).resolve().parents:
            continue  # a subdirectory conftest's hook sees the whole session's items
        item.add_marker(pytest.mark.gpu)
        if reason:  # as the first skipif, so its reason wins over a test's own (TE missing)
            item.add_marker(pytest.mark.skipif(True, reason=reason), append=False)
