"""The importance-scores file: one estimation serves many prune targets.

SCORES/scores.safetensors   per layer i and aggregation a ("<seq>-<batch>"):
                              layer{i}.heads.{a}    [num_attention_heads]
                              layer{i}.mlp.{a}      [ffn_hidden_size]
                              layer{i}.hidden.{a}   [hidden_size] (both norms of the layer)
                            layer_bi [num_layers]              block importance 1 - cos
                            layer_loss.block{n} [L - n + 1]   LM loss without layers i..i+n-1
                            base_loss []                       LM loss of the full model
SCORES/scores.json          provenance: checkpoint, its id and arch, data, sample count,
                            the default aggregation, user metric values
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from minitron_mcore.errors import MinitronError, require

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

        tmp = path.rstrip("/") + ".partial"
        os.makedirs(tmp, exist_ok=True)
        save_file(
            {k: v.contiguous().float() for k, v in self.tensors.items()}, os.path.join(tmp, TENSORS)
        )
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(self.info, f, indent=2, sort_keys=True)
        from minitron_mcore.checkpoint.megatron import atomic_swap

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
