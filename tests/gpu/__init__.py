"""The GPU test set (``python3 -m pytest -q -m gpu``): a package, so that its ``conftest`` is
``gpu.conftest`` and never shadows ``tests/conftest.py``, which the CPU suite imports as
``conftest``."""
