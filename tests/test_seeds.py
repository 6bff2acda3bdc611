"""Seeding: pipeline stages must not draw their initial weights from the same random stream."""

import itertools
import os

import pytest
from conftest import WORKERS, launch

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def pp2_init(tmp_path_factory):
    """Initial weights of a 4-layer model built at PP=2: {stage: {name: tensor}}."""
    from safetensors.torch import load_file

    out = str(tmp_path_factory.mktemp("pp_init") / "weights.safetensors")
    launch([os.path.join(WORKERS, "pp_init_weights.py"), out], nproc=2, timeout=120)
    stages = {}
    for key, value in load_file(out).items():
        stage, name = key.split("/", 1)
        stages.setdefault(int(stage.removeprefix("stage")), {})[name] = value
    return stages


def _layers(stages):
    """{global layer number: [its random matrices]} over all stages."""
    layers = {}
    for params in stages.values():
        for name, value in sorted(params.items()):
            if name.startswith("decoder.layers."):
                layers.setdefault(int(name.split(".")[2]), []).append(value)
    return layers


def test_pp_stages_hold_all_layers(pp2_init):
    assert sorted(pp2_init) == [0, 1]
    assert sorted(_layers(pp2_init)) == [1, 2, 3, 4]


def test_no_two_layers_start_equal(pp2_init):
    layers = _layers(pp2_init)
    for a, b in itertools.combinations(sorted(layers), 2):
        for wa, wb in zip(layers[a], layers[b]):
            assert not wa.equal(wb), f"layers {a} and {b} start with equal weights"


def test_pp_stages_draw_from_different_random_streams(pp2_init):
    """Seeding every stage alike makes stage 1 replay stage 0's random numbers (shifted by what
    the embedding consumed): its layers then repeat stage 0's values.  Independent draws from
    N(0, 0.02) share almost no exact float32 values."""
    import torch

    stage0 = set(torch.cat([v.flatten() for v in pp2_init[0].values()]).tolist())
    stage1 = torch.cat(
        [v.flatten() for n, v in pp2_init[1].items() if n.startswith("decoder.layers.")]
    ).tolist()
    shared = sum(x in stage0 for x in stage1) / len(stage1)
    assert shared < 0.01, f"{shared:.0%} of stage 1's layer weights repeat stage 0's values"
