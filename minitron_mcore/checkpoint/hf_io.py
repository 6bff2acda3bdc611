"""Reading and writing Hugging Face model directories (config, safetensors, tokenizer).

The tensor layout conversion is in :mod:`hf_mapping`; this module does the file I/O: lazy,
per-tensor reads with ``safetensors.safe_open`` (each rank reads only what it needs) and sharded
safetensors writes with an index, as ``transformers`` expects.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterable

import torch

from minitron_mcore.data.tokenizer import TOKENIZER_FILES, tokenizer_files  # noqa: F401
from minitron_mcore.errors import MinitronError, require

HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def read_hf_config(hf_dir: str) -> dict:
    require(bool(hf_dir), "load= is empty; pass a Hugging Face model directory")
    require(
        os.path.isdir(hf_dir), f"Hugging Face model directory {hf_dir} does not exist; check load="
    )
    path = os.path.join(hf_dir, "config.json")
    require(
        os.path.isfile(path),
        f"{hf_dir} has no config.json; point load= at a Hugging Face model directory",
    )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MinitronError(
            f"{path} is not valid JSON ({e}); re-download or re-save the model"
        ) from e


def read_generation_config(hf_dir: str) -> dict | None:
    path = os.path.join(hf_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def hf_dtype(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return HF_DTYPES.get(str(name).replace("torch.", ""), "fp32")


def check_tokenizer(src_dir: str) -> list[str]:
    """The tokenizer files in ``src_dir``; fails clearly if there are none or they do not load."""
    files = tokenizer_files(src_dir)
    require(
        bool(files),
        f"no tokenizer files in {src_dir}; pass tokenizer=DIR with tokenizer.json "
        "or tokenizer.model",
    )
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(src_dir, local_files_only=True)
    except Exception as e:
        raise MinitronError(
            f"the tokenizer in {src_dir} does not load ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); fix or replace its files"
        ) from e
    return files


class SafetensorsReader:
    """Name -> tensor over one or many safetensors files, read lazily."""

    def __init__(self, hf_dir: str):
        from safetensors import SafetensorError, safe_open

        self._error = SafetensorError
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [
                os.path.basename(p)
                for p in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            ]
            weight_map = None
        if not files:
            bins = glob.glob(os.path.join(hf_dir, "*.bin"))
            hint = (
                (
                    "; only safetensors weights are read: re-save the model with "
                    "save_pretrained(..., safe_serialization=True)"
                )
                if bins
                else ""
            )
            raise MinitronError(f"no *.safetensors weights in {hf_dir}{hint}")
        self._handles, self._where = {}, {}
        for name in files:
            path = os.path.join(hf_dir, name)
            require(
                os.path.isfile(path),
                f"{path} listed in the index is missing; re-download the model",
            )
            try:
                h = safe_open(path, framework="pt")
            except (self._error, OSError, ValueError) as e:
                raise MinitronError(
                    f"corrupt safetensors file {path} ({e}); re-download or re-save the model"
                ) from e
            self._handles[name] = h
            for key in h.keys():
                self._where[key] = name
        if weight_map:
            self._where.update({k: v for k, v in weight_map.items() if v in self._handles})

    def names(self) -> set[str]:
        return set(self._where)

    def close(self) -> None:
        """Drop the file handles (and their memory maps)."""
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        require(name in self._where, f"tensor {name} is missing from the safetensors weights")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (self._error, OSError, ValueError, RuntimeError) as e:
            raise MinitronError(
                f"corrupt safetensors file {self._where[name]} while reading {name} "
                f"({e}); re-download or re-save the model"
            ) from e


class SafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of bounded size, plus the
    index ``transformers`` reads (or a single ``model.safetensors``)."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []

    def add(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        for name, t in tensors.items():
            # safetensors refuses views that share storage: give every tensor its own copy.
            t = t.detach().to(dtype).contiguous().clone()
            if self._pending and self._pending_bytes + t.nbytes > self.max_bytes:
                self._flush()
            self._pending[name] = t
            self._pending_bytes += t.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f"shard-{len(self._shards):05d}.tmp")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> int:
        """Write the last shard, name the shards, write the index. Returns the total bytes."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        total, weight_map = 0, {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            src = os.path.join(self.out_dir, f"shard-{i:05d}.tmp")
            total += os.path.getsize(src)
            os.replace(src, os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return total


def _refusal_errors() -> tuple:
    """What transformers raises for a config it refuses: its ``@strict`` validators
    (huggingface_hub's StrictDataclassError, transformers 5) and the ValueError / TypeError of
    older checks."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # a huggingface_hub without strict dataclasses (transformers 4)
        return (ValueError, TypeError)
    return (StrictDataclassError, ValueError, TypeError)


def _reason(e: Exception) -> str:
    """transformers' own words for a refusal, one line: a strict validator wraps the ValueError
    that says what is wrong, so that one is shown."""
    inner = e.__cause__ if isinstance(e.__cause__, (ValueError, TypeError)) else e
    lines = [x.strip() for x in str(inner).splitlines() if x.strip()]
    return (lines[-1] if lines else type(inner).__name__).rstrip(".")[:300]


def causal_lm_class(model_type: str) -> str | None:
    """The class ``AutoModelForCausalLM`` builds for ``model_type`` in the installed transformers
    (its name; None when there is none), found without importing the modelling code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def hf_config_object(cfg: dict):
    """transformers' own config class for a ``config.json`` dict (``cfg`` is not modified),
    naming the causal-LM class it loads as. Raises whatever transformers raises for it."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    fallback = type(config).__name__.replace("Config", "ForCausalLM")
    config.architectures = [causal_lm_class(model_type) or fallback]
    return config


def hf_config_refusal(cfg: dict) -> str | None:
    """Why the installed transformers would not load a model with ``cfg`` (its own words, one
    line), or None when it would. The rule is transformers' own: its config class must accept
    ``cfg`` (transformers 5 validates configs when they are built) and ``AutoModelForCausalLM``
    must have a class for the model type; nothing is re-derived here, so a newer transformers
    with other rules is followed as it is."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES or not causal_lm_class(model_type):
        return f"transformers {transformers.__version__} has no causal LM for {model_type!r}"
    try:
        hf_config_object(cfg)
    except _refusal_errors() as e:
        return _reason(e)
    return None


def write_hf_config(out_dir: str, cfg: dict, generation: dict | None) -> None:
    """config.json (through transformers' own config class) and generation_config.json."""
    from transformers import GenerationConfig

    hf_config_object(cfg).save_pretrained(out_dir)
    if generation:
        GenerationConfig.from_dict(generation).save_pretrained(out_dir)


def copy_files(files: Iterable[str], out_dir: str) -> None:
    for f in files:
        shutil.copy2(f, out_dir)
