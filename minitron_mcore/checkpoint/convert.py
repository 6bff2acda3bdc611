"""The ``import-hf`` and ``export-hf`` commands.

minitron import-hf load=HF_DIR save=CKPT [parallel.tp=2] [dtype=fp32]
torchrun --nproc-per-node 2 -m minitron_mcore import-hf load=HF_DIR save=CKPT parallel.tp=2
minitron export-hf load=CKPT save=HF_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from minitron_mcore.checkpoint import hf_io, hf_mapping
from minitron_mcore.checkpoint.layout import is_hf_dir
from minitron_mcore.checkpoint.megatron import (
    CheckpointMeta,
    WeightsReader,
    atomic_swap,
    check_save_target,
    fill_model,
    read_meta,
    save_checkpoint,
    tokenizer_files_of,
)
from minitron_mcore.checkpoint.rerun import already_done, checkpoint_fingerprint, fingerprint
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.models.arch import padded_vocab_size
from minitron_mcore.models.build import build_model_for_stage, resolve_dtype
from minitron_mcore.parallel import ParallelConfig, parallel_context, world_size
from minitron_mcore.utils.faults import fault_point
from minitron_mcore.utils.log import emit_metrics, human_count, log0, progress


@dataclass
class ImportHFConfig:
    """``minitron import-hf``: Hugging Face directory -> Megatron checkpoint."""

    load: str = ""
    """Hugging Face model directory (config.json, *.safetensors, tokenizer files)."""
    save: str = ""
    """Output checkpoint directory."""
    tokenizer: str = ""
    """Directory with the tokenizer files; empty = the model directory."""
    dtype: str = "auto"
    """Weight dtype in the checkpoint: auto (the HF config's dtype), fp32, bf16 or fp16."""
    overwrite: bool = False
    """Replace ``save`` if it exists (atomically, only once the new checkpoint is complete)."""
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ExportHFConfig:
    """``minitron export-hf``: Megatron checkpoint -> Hugging Face directory."""

    load: str = ""
    """Checkpoint directory written by minitron."""
    save: str = ""
    """Output Hugging Face model directory."""
    dtype: str = "auto"
    """Exported weight dtype: auto (the checkpoint's), fp32, bf16 or fp16."""
    max_shard_size_gb: float = 5.0
    """Split the safetensors weights into files of at most this size."""
    overwrite: bool = False
    """Replace ``save`` if it exists (atomically, only once the export is complete)."""


def model_arch_of(path: str):
    """The shape of the model at ``path`` without reading a weight: a Hugging Face directory's
    ``config.json`` as ``import-hf`` maps it, or a minitron checkpoint's sidecar."""
    if is_hf_dir(path):
        return hf_mapping.arch_from_hf_config(hf_io.read_hf_config(path))
    return read_meta(path).arch


def import_hf(cfg: ImportHFConfig) -> dict:
    t0 = time.time()
    hf_cfg = hf_io.read_hf_config(cfg.load)
    arch = hf_mapping.arch_from_hf_config(hf_cfg)
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    fp = fingerprint("import-hf", cfg, {"load": cfg.load, "tokenizer": cfg.tokenizer})
    done = already_done("import-hf", cfg.save, cfg.overwrite, fp, checkpoint_fingerprint)
    if done:
        emit_metrics(done, cfg.save)
        return done
    check_save_target(cfg.save, cfg.overwrite)
    tok_files = hf_io.check_tokenizer(cfg.tokenizer or cfg.load)
    reader = hf_io.SafetensorsReader(cfg.load)
    hf_mapping.check_hf_names(reader.names(), arch)
    dtype_name = hf_io.hf_dtype(hf_cfg) if cfg.dtype == "auto" else cfg.dtype
    dtype = resolve_dtype(dtype_name)

    def get(name):
        t = reader.get(name)
        require(
            bool(torch.isfinite(t).all()),
            f"{name} in {cfg.load} holds values that are not finite (NaN or Inf); the model "
            "is damaged: re-download it or fix the weights before importing",
        )
        return t.to(dtype)

    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "import-hf: %s (%s, %s params) -> %s at TP=%d PP=%d, %s",
            cfg.load,
            arch.family,
            human_count(arch.num_params()),
            cfg.save,
            cfg.parallel.tp,
            cfg.parallel.pp,
            dtype_name,
        )
        # Every weight is overwritten from the HF files: skip Megatron's random init (~40% of
        # the import time on a 1B model, see benchmarks/README.md). Not for models that train:
        # with CPU initialisation Megatron then skips marking the TP-sharded parameters, and
        # gradient-norm clipping would count them wrongly.
        model = build_model_for_stage(arch, dtype, perform_initialization=False)
        padded = padded_vocab_size(arch.vocab_size)
        fill_model(
            model,
            layer_fn=lambda i: hf_mapping.hf_layer_to_canonical(get, i, arch),
            global_fn=lambda: hf_mapping.hf_global_to_canonical(get, arch, padded),
            desc="import-hf",
        )
        meta = CheckpointMeta(
            arch=arch,
            dtype=dtype_name,
            hf_config=hf_cfg,
            hf_generation_config=hf_io.read_generation_config(cfg.load),
        ).with_step("import-hf", source=os.path.abspath(cfg.load), fingerprint=fp)
        reader.close()  # unmap the source files before the save's own copies peak
        save_checkpoint(model, cfg.save, meta, tok_files)
    metrics = {
        "command": "import-hf",
        "family": arch.family,
        "params": arch.num_params(),
        "seconds": round(time.time() - t0, 3),
        "save": cfg.save,
    }
    emit_metrics(metrics, cfg.save)
    return metrics


def export_hf(cfg: ExportHFConfig) -> dict:
    require(
        world_size() == 1,
        "export-hf runs in a single process; launch it without torchrun",
    )
    metrics = write_hf_export(cfg)
    emit_metrics(metrics, cfg.save)
    return metrics


EXPORT_INFO = "minitron_export.json"
"""Written into every HF export: the checkpoint it came from and the command's fingerprint."""


def _export_fingerprint(save: str) -> str | None:
    with open(os.path.join(save, EXPORT_INFO)) as f:
        return json.load(f)["fingerprint"]


def write_hf_export(cfg: ExportHFConfig) -> dict:
    """The export itself (one process; ``minitron pipeline`` calls it on rank 0 alone, so it
    makes no collective call: the other ranks wait for it in ``fail_together``)."""
    t0 = time.time()
    meta = read_meta(cfg.load)
    fp = fingerprint("export-hf", cfg, {"load": cfg.load})
    done = already_done(
        "export-hf", cfg.save, cfg.overwrite, fp, _export_fingerprint, every_rank=False
    )
    if done:
        return done
    check_save_target(cfg.save, cfg.overwrite)
    arch = meta.arch
    dtype_name = meta.dtype if cfg.dtype == "auto" else cfg.dtype
    dtype = resolve_dtype(dtype_name)
    _require_exportable(cfg.load, meta)  # before a byte is written
    tmp = cfg.save.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        nbytes = _write_hf_weights(cfg, meta, tmp, dtype)
        fault_point("export:weights-written")
        hf_io.write_hf_config(
            tmp,
            hf_mapping.hf_config_from_arch(arch, meta.hf_config, dtype_name),
            meta.hf_generation_config,
        )
        # transformers 5 writes only rope_parameters; engines and converters read the classic
        # rope_theta / rope_scaling keys, so write both.
        hf_mapping.write_classic_rope_keys(tmp)
        hf_io.copy_files(tokenizer_files_of(cfg.load), tmp)
        fault_point("export:config-written")
        info = {  # no path: exports get published
            "source_checkpoint_id": meta.checkpoint_id,
            "dtype": dtype_name,
            "fingerprint": fp,
        }
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        fault_point("export:info-written")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_swap(tmp, cfg.save)
    metrics = {
        "command": "export-hf",
        "family": arch.family,
        "params": arch.num_params(),
        "bytes": nbytes,
        "seconds": round(time.time() - t0, 3),
        "save": cfg.save,
    }
    log0("exported %s -> %s", cfg.load, cfg.save)
    return metrics


def _require_exportable(load: str, meta: CheckpointMeta) -> None:
    """One error line, naming the size to change, when the installed transformers would refuse
    the config this export writes (transformers 5 validates configs as they are built, e.g.
    Llama's hidden size must be a multiple of its head count), instead of its traceback after
    the weights were written. Checkpoints pruned since ``prune`` checks this never get here."""
    import transformers

    reason = hf_mapping.export_refusal(meta.arch, meta.hf_config)
    if reason is None:
        return
    head = (
        f"transformers {transformers.__version__} refuses the {meta.arch.family} config of "
        f"load={load} ({reason})"
    )
    if hf_io.causal_lm_class(meta.arch.family) is None:
        raise MinitronError(f"{head}; the key that is wrong: family={meta.arch.family}")
    found = hf_mapping.refused_size(meta.arch, meta.hf_config)
    if found is None:
        raise MinitronError(f"{head}; no single size change nearby fixes it")
    key, near = found
    values = " or ".join(map(str, near))
    redo = "rebuild it with model"
    if meta.prune_plan:
        redo = "prune its source again with prune.target"
    raise MinitronError(
        f"{head}; the key that is wrong: {key}={getattr(meta.arch, key)} "
        f"(nearest accepted: {values}); {redo}.{key} set to one of them"
    )


def _write_hf_weights(cfg: ExportHFConfig, meta: CheckpointMeta, out_dir: str, dtype) -> int:
    """Convert layer by layer: peak memory is one layer plus one output shard, not the model."""
    arch = meta.arch
    reader = WeightsReader(cfg.load)
    writer = hf_io.SafetensorsWriter(out_dir, int(cfg.max_shard_size_gb * 2**30))
    writer.add(
        hf_mapping.canonical_global_to_hf(reader.read(hf_mapping.global_keys(arch)), arch), dtype
    )
    keys = hf_mapping.layer_keys(arch)
    for i in progress(range(arch.num_layers), desc="export-hf", unit="layer"):
        writer.add(hf_mapping.canonical_layer_to_hf(reader.read(keys, layer=i), i, arch), dtype)
    return writer.finish()
