"""The layout of a minitron checkpoint directory and its JSON sidecar (``minitron.json``): the
schema, finding the current version, and the checks every reader and writer makes first.
(:mod:`minitron_mcore.checkpoint.megatron` describes the layout and how saves keep it safe.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from minitron_mcore.errors import MinitronError, first_line, require
from minitron_mcore.models.arch import ModelArch

META_FILE = "minitron.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    """Everything next to the weights that makes a checkpoint describe itself."""

    arch: ModelArch
    dtype: str = "fp32"
    saved_tp: int = 1
    saved_pp: int = 1
    hf_config: Optional[dict] = None
    hf_generation_config: Optional[dict] = None
    prune_plan: Optional[dict] = None
    provenance: list = field(default_factory=list)
    train_state: Optional[dict] = None
    checkpoint_id: str = ""
    """A fresh id for every save: importance scores record it, so pruning can refuse scores
    computed on a different checkpoint."""
    format_version: int = FORMAT_VERSION
    version: str = ""
    """Set in a checkpoint directory's tracker only: the subdirectory of the current version."""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.to_dict()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        d["arch"] = ModelArch.from_dict(d["arch"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_step(self, stage: str, **info) -> CheckpointMeta:
        """A copy with one more provenance entry (stage name, time, details)."""
        entry = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        return dataclasses.replace(self, provenance=list(self.provenance) + [entry])


def _not_a_checkpoint(path: str) -> MinitronError:
    hint = (
        f"it looks like a Hugging Face model: run `minitron import-hf load={path} save=CKPT`"
        if os.path.isfile(os.path.join(path, "config.json"))
        else "point load= at a directory written by minitron"
    )
    return MinitronError(f"{path} is not a minitron checkpoint (no {META_FILE}); {hint}")


def read_json_meta(path: str) -> CheckpointMeta:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            return CheckpointMeta.from_json(f.read())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise MinitronError(f"{path}/{META_FILE} is corrupt ({e}); re-create the checkpoint") from e


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory (``config.json``), not a minitron checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, META_FILE)
    )


def resolve_checkpoint(path: str) -> str:
    """The directory that holds the current version's files: ``path/<version>`` for a
    checkpoint directory with a tracker, ``path`` itself for one version (or an old flat
    checkpoint)."""
    require(bool(path), "load= is empty; pass the checkpoint directory, e.g. load=runs/ckpt")
    require(os.path.isdir(path), f"checkpoint directory {path} does not exist; check load=")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise _not_a_checkpoint(path)
    version = read_json_meta(path).version
    if not version:
        return path
    inner = os.path.join(path, version)
    require(
        os.path.isfile(os.path.join(inner, META_FILE)),
        f"checkpoint {path} names version {version}, which is missing; the directory was "
        "damaged - restore it or re-create the checkpoint",
    )
    return inner


def check_checkpoint_dir(path: str) -> str:
    """Validate ``path`` and return the directory holding its current version's files."""
    inner = resolve_checkpoint(path)
    require(
        os.path.isdir(os.path.join(inner, WEIGHTS_DIR)),
        f"checkpoint {path} has no {WEIGHTS_DIR}/ directory; it is incomplete, re-create it",
    )
    return inner


def read_meta(path: str) -> CheckpointMeta:
    """The current version's sidecar (``version`` cleared: it describes the model)."""
    return dataclasses.replace(read_json_meta(check_checkpoint_dir(path)), version="")


def check_save_target(path: str, overwrite: bool) -> None:
    """Refuse, before any work is done, to replace an existing output without overwrite=true."""
    require(bool(path), "save= is empty; pass an output directory, e.g. save=runs/ckpt")
    require(
        overwrite or not os.path.exists(path),
        f"save={path} already exists; choose a new directory or pass overwrite=true",
    )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the first existing ancestor is where mkdir starts
        parent = os.path.dirname(parent)
    require(
        os.access(parent, os.W_OK),
        f"save={path}: {parent} is not writable (read-only or immutable); choose a writable "
        "directory for save=",
    )


def tokenizer_files_of(ckpt: str) -> list[str]:
    """The tokenizer files stored in checkpoint ``ckpt`` (to carry them into a new one)."""
    d = os.path.join(resolve_checkpoint(ckpt), TOKENIZER_DIR)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def resolve_tokenizer_path(path: str) -> str:
    """A checkpoint directory stands for its ``tokenizer/`` subdirectory."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return os.path.join(resolve_checkpoint(path), TOKENIZER_DIR)
    return path


VERSION_RE = re.compile(r"^(iter_(\d{7,})|release-[0-9a-f]{8})$")
"""A version's directory name: ``iter_<step>`` (training) or ``release-<id>``."""


def current_version(home: str) -> Optional[str]:
    """The version a checkpoint directory's tracker names (None: none or a flat checkpoint)."""
    if not os.path.isfile(os.path.join(home, META_FILE)):
        return None
    return read_json_meta(home).version or None


def newest_training_version(d: str, required=(META_FILE,)) -> Optional[tuple[int, str]]:
    """(step, name) of the newest ``iter_N`` version inside ``d`` holding every file of
    ``required``, or None (a version without them was not finished)."""
    found = []
    for x in os.listdir(d):
        m = VERSION_RE.match(x)
        if m and m.group(2) and all(os.path.isfile(os.path.join(d, x, f)) for f in required):
            found.append((int(m.group(2)), x))
    return max(found) if found else None


@contextlib.contextmanager
def reading_checkpoint(path: str):
    """Turn the many exception types a damaged checkpoint raises into one clear error.
    (torch DCP's CheckpointException derives from BaseException, hence the wide net.)"""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, MinitronError):
        raise
    except BaseException as e:
        raise MinitronError(
            f"cannot read checkpoint weights in {path} ({type(e).__name__}: {first_line(e)}); "
            "the checkpoint is corrupt or incomplete, re-create it"
        ) from e
