"""The importance-scores file: one estimation serves many prune targets.

SCORES/scores.safetensors   per layer i and aggregation a ("<seq>-<batch>"):
                              layer{i}.heads.{a}    [num_attention_heads]
                              layer{i}.mlp.{a}      [ffn_hidden_size]
                              layer{i}.hidden.{a}   [hidden_size] (both norms of the layer)
                            layer_bi [num_layers]              block importance 1 - cos
                            layer_loss.block{n} [L - n + 1]   LM loss without layers i..i+n-1
                            base_loss []                       LM loss of the full model
SCORES/scores.json          provenance: checkpoint, its id and arch, data, sample count,
                            the default aggregation, user metric values, and the
                            fingerprint of the command (a re-run is a no-op)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.faults import fault_point

TENSORS = "scores.safetensors"
INFO = "scores.json"


@dataclass
class Scores:
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    @property
    def default_agg(self) -> str:
        return self.info.get("default_agg", "mean-l2")

    def site(self, layer: int, name: str, agg: str | None = None) -> torch.Tensor:
        key = f"layer{layer}.{name}.{agg or self.default_agg}"
        require(key in self.tensors, f"the scores file has no {key}; re-run minitron importance")
        return self.tensors[key]

    def hidden(self, layers, agg: str | None = None) -> torch.Tensor:
        """Embedding-channel score summed over ``layers`` (the layers that are kept)."""
        return sum(self.site(i, "hidden", agg) for i in layers)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        from minitron_mcore.checkpoint.megatron import atomic_swap

        # Written beside the target and swapped in whole: a reader sees no scores directory or
        # a complete one (a stale .partial from a killed run is replaced).
        tmp = path.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(
            {k: v.contiguous().float() for k, v in self.tensors.items()}, os.path.join(tmp, TENSORS)
        )
        fault_point("scores:tensors-written")
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(self.info, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fault_point("scores:info-written")
        atomic_swap(tmp, path)

    @classmethod
    def load(cls, path: str) -> Scores:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        require(bool(path), "scores= is empty; pass the directory written by minitron importance")
        files = [os.path.join(path, TENSORS), os.path.join(path, INFO)]
        require(
            all(os.path.isfile(f) for f in files),
            f"{path} is not an importance-scores directory (needs {TENSORS} and {INFO}); "
            "run `minitron importance load=CKPT save=SCORES` first",
        )
        try:
            tensors = load_file(files[0])
            with open(files[1]) as f:
                info = json.load(f)
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise MinitronError(f"the scores in {path} are corrupt ({e}); re-run importance") from e
        return cls(tensors, info)


def scores_fingerprint(path: str) -> str | None:
    """The fingerprint of the command that wrote the scores in ``path`` (checkpoint/rerun.py)."""
    with open(os.path.join(path, INFO)) as f:
        return json.load(f).get("fingerprint")
