"""Importance inside mixture-of-experts layers, from the forward passes of the calibration set.

Per layer and expert (global index ``e``), over every token routed to it:

* ``experts.score``: the mean over routed tokens of ``p(t, e) * ||y_e(t)||``, the router
  probability times the norm of the expert's output, i.e. the norm of what the expert adds to
  the token's hidden state. Megatron's expert MLP multiplies its activation by ``p`` before
  ``linear_fc2`` (``per_token_scale``), so this is the norm of ``linear_fc2``'s output, summed
  over tokens and divided by the layer's routed-token count (a never-routed expert scores 0).
* ``experts.frequency``: the share of the layer's routings that go to the expert.
* ``experts.prob``: its share of the router probability mass given to routed experts.
* ``expert_mlp.<agg>`` ``[E, f]``: per-neuron importance inside each expert, from the input of
  its ``linear_fc2`` (activation x router probability). Routed tokens have no sample structure
  (a micro-batch's tokens are permuted and, under expert parallelism, come from several ranks),
  so each token is one sample of sequence length 1: every ``<seq>-<batch>`` aggregation is the
  batch aggregation over tokens, and the statistics are sums over tokens - the same at any
  TP/EP/DP split of the data.

Every statistic is a sum over tokens, so expert-data-parallel ranks' partial sums add; expert
tensor parallelism splits each expert's FFN (its ``linear_fc2`` outputs are partial sums, added
here before the norm is taken; its neurons are gathered like the dense MLP's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minitron_mcore.importance.aggregate import Accumulator, all_scores


class ExpertCollector:
    """Hooks on every local expert of every MoE layer of one pipeline stage."""

    def __init__(self, model):
        self.sequence_parallel = bool(model.config.sequence_parallel)
        self.experts = {}  # (layer, global expert) -> expert MLP module
        for layer in model.decoder.layers:
            mlp = layer.mlp
            if not hasattr(mlp, "router"):
                continue
            for local, e in enumerate(mlp.local_expert_indices):
                self.experts[(layer.layer_number - 1, int(e))] = mlp.experts.local_experts[local]
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # [tokens, prob mass, p * ||y||]
        self.neurons: dict[tuple[int, int], Accumulator] = {}
        self._handles = []

    def attach(self) -> None:
        from megatron.core import parallel_state as ps

        etp = ps.get_expert_tensor_parallel_world_size()
        etp_group = ps.get_expert_tensor_parallel_group() if etp > 1 else None
        for key, expert in self.experts.items():
            self.sums[key] = torch.zeros(3, dtype=torch.float64)
            self.neurons[key] = Accumulator()

            def on_expert(mod, args, out, key=key):
                tokens, probs = args[0], args[1]
                y = out[0].detach().float()
                if etp_group is not None and y.shape[0]:  # partial sums of the split FFN
                    y = y.clone()
                    dist.all_reduce(y, group=etp_group)
                row = torch.stack(
                    [
                        torch.tensor(float(tokens.shape[0]), dtype=torch.float64),
                        probs.detach().double().sum().cpu(),
                        y.norm(dim=-1).double().sum().cpu(),
                    ]
                )
                self.sums[key] += row

            def on_fc2(mod, args, key=key):  # tokens are samples of length 1: [1, n, f]
                self.neurons[key].add(args[0].detach().abs().unsqueeze(0))

            self._handles += [
                expert.register_forward_hook(on_expert),
                expert.linear_fc2.register_forward_pre_hook(on_fc2),
            ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reduce(self) -> dict[str, torch.Tensor]:
        """Sum over the expert-data-parallel ranks, gather the expert-TP neuron slices; returns
        this rank's experts as ``layer{i}.<site>.e{e}`` entries (:func:`stack_experts` joins
        every rank's)."""
        from megatron.core import parallel_state as ps

        edp = ps.get_expert_data_parallel_group()
        etp = ps.get_expert_tensor_parallel_world_size()
        # Without sequence parallelism (how importance builds its model) the TP ranks
        # hold the same tokens, and the all-to-all dispatcher gathers every one of them over the
        # expert-TP group: each expert sees each token once per expert-TP rank (the combine's
        # reduce-scatter hands each copy back). Token sums are divided by that count.
        copies = 1.0 if self.sequence_parallel else float(etp)
        out = {}
        for key in sorted(self.experts):  # same order on every rank of an expert's groups
            layer, e = key
            sums = self.sums[key] / copies
            dist.all_reduce(sums, group=edp)
            acc = self.neurons[key]
            if not acc.stats:  # never called (no forward ran): zeros of the local width
                width = self.experts[key].linear_fc2.weight.shape[1]
                acc.add(torch.zeros(1, 0, width))
            flat = acc.flat() / copies
            dist.all_reduce(flat, group=edp)
            acc.load_flat(flat)
            stats = dict(acc.stats)
            if etp > 1:
                for k, v in stats.items():
                    if k != "count":
                        parts = [torch.empty_like(v) for _ in range(etp)]
                        dist.all_gather(
                            parts, v.contiguous(), group=ps.get_expert_tensor_parallel_group()
                        )
                        stats[k] = torch.cat(parts)
            out[f"layer{layer}.expert_sums.e{e}"] = sums.float()
            for agg, score in all_scores(stats).items():
                out[f"layer{layer}.expert_mlp.{agg}.e{e}"] = score.cpu()
        return out


def stack_experts(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's ``layer{i}.<site>.e{e}`` entries -> per layer ``[E, ...]`` tensors:
    ``experts.score`` / ``experts.frequency`` / ``experts.prob`` ``[E]`` and
    ``expert_mlp.<agg>`` ``[E, f]``."""
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for k, v in merged.items():
        head, sep, tail = k.rpartition(".e")
        if sep and tail.isdigit() and ".expert_" in head:
            grouped.setdefault(head, {})[int(tail)] = v
        else:
            out[k] = v
    for head, per in grouped.items():
        stacked = torch.stack([per[e] for e in sorted(per)])
        if head.endswith(".expert_sums"):
            layer = head[: -len(".expert_sums")]
            tokens, prob, contrib = stacked.double().unbind(1)
            routed = tokens.sum().clamp(min=1)
            out[f"{layer}.experts.score"] = (contrib / routed).float()
            out[f"{layer}.experts.frequency"] = (tokens / routed).float()
            out[f"{layer}.experts.prob"] = (prob / routed).float()
        else:
            out[head] = stacked
    return out
