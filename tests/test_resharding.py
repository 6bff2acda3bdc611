"""dist_checkpointing resharding: saved at TP=2 PP=2, loaded at TP=1 PP=1, and back."""

import pytest
import torch
from conftest import megatron_logits, minitron

from minitron_mcore.checkpoint.megatron import WeightsReader

pytestmark = pytest.mark.multiproc


@pytest.mark.slow  # ~35 s; HF import at TP=2 / PP=2 and loads at other layouts stay in CI
def test_tp2pp2_to_tp1pp1_and_back(hf_models, tokens_file, tmp_path):
    src = hf_models["llama"]
    ckpt22 = str(tmp_path / "tp2pp2")
    minitron(
        "import-hf", f"load={src}", f"save={ckpt22}", "parallel.tp=2", "parallel.pp=2", nproc=4
    )
    # One layer read straight from the files (how prune and export-hf read) is exactly that
    # layer of the global tensor, whatever chunks the TP=2 x PP=2 ranks wrote.
    reader = WeightsReader(ckpt22)
    full = reader.read(list(reader.shapes))
    layer_keys = [k for k in reader.shapes if k.startswith("decoder.layers.")]
    assert len(layer_keys) >= 6
    for i in range(reader.shapes[layer_keys[0]][0]):
        for k, v in reader.read(layer_keys, layer=i).items():
            assert torch.equal(v, full[k][i]), (i, k)
    # TP2PP2 checkpoint -> loaded at TP1PP1 and re-saved from there.
    ckpt11 = str(tmp_path / "tp1pp1")
    l11 = megatron_logits(ckpt22, tokens_file, str(tmp_path / "a.st"), 1, 1, resave=ckpt11)
    # ... and the TP1PP1 save loaded at TP2PP2 and re-saved from there.
    ckpt22b = str(tmp_path / "tp2pp2b")
    l22 = megatron_logits(ckpt11, tokens_file, str(tmp_path / "b.st"), 2, 2, resave=ckpt22b)
    l11b = megatron_logits(ckpt22b, tokens_file, str(tmp_path / "c.st"), 1, 1)
    # The same weights on the same layout give bitwise-identical logits.
    assert torch.equal(l11, l11b)
    # A different layout only reorders floating-point reductions.
    assert (l22 - l11).abs().max().item() <= 1e-5


def test_weights_reader_errors(llama_ckpt, tmp_path):
    """Asking for a tensor or layer the checkpoint does not have names the problem."""
    from minitron_mcore.errors import MinitronError

    reader = WeightsReader(llama_ckpt)
    with pytest.raises(MinitronError, match="has no tensor decoder.layers.nope"):
        reader.read(["decoder.layers.nope"], layer=0)
    layers = reader.shapes["decoder.layers.mlp.linear_fc2.weight"][0]
    with pytest.raises(MinitronError, match=f"has no layer {layers}"):
        reader.read(["decoder.layers.mlp.linear_fc2.weight"], layer=layers)
    with pytest.raises(MinitronError, match="does not exist"):
        WeightsReader(str(tmp_path / "missing"))
