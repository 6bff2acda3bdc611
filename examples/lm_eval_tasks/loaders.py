"""Datasets of the example lm-eval tasks, read from the JSONL files next to this module.

lm-eval's ``dataset_path: json`` + ``dataset_kwargs.data_files`` hands the paths to
``datasets.load_dataset``, which resolves relative paths against the working directory, not the
YAML.  A ``custom_dataset: !function loaders.<name>`` is found relative to the YAML, so these
tasks work from any directory, offline, and write nothing to the datasets cache.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl_split(filename: str):
    import datasets

    with open(os.path.join(HERE, filename), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def stdlib_mc(**kwargs):
    """40 multiple-choice questions on what a Python expression returns."""
    return _jsonl_split("stdlib_mc.jsonl")


def stdlib_gen(**kwargs):
    """12 short-answer questions of the same kind, answered by greedy generation."""
    return _jsonl_split("stdlib_gen.jsonl")
