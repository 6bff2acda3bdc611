"""No silent data defaults: the demo corpus is used only when named, a command given no data
fails with one line naming data.train, and data.cache_dir is absolute."""

import os

import pytest

from minitron_mcore.cli import compose, main
from minitron_mcore.data.datasets import DataConfig

DATA_COMMANDS = ("pretrain", "correct", "evaluate", "importance")


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_no_command_defaults_to_the_demo_corpus(command):
    cfg = compose(command, [])
    assert cfg.data.train == [] and cfg.data.valid == [], cfg.data
    assert DataConfig().train == []


def test_cache_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = os.path.join(str(tmp_path), "some", "cache")
    assert DataConfig(cache_dir="some/cache").cache_dir == want
    assert compose("evaluate", ["data.cache_dir=some/cache"]).data.cache_dir == want
    assert compose("correct", []).data.cache_dir == os.path.join(str(tmp_path), "runs", "data")


def _one_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0]


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_command_without_data_fails_naming_data_train(
    capsys, command, llama_ckpt, tokenizer_dir, tmp_path
):
    cache = tmp_path / "cache"
    common = [f"data.cache_dir={cache}", f"save={tmp_path}/out"]
    train = [
        "train.steps=2",
        "train.warmup_steps=1",
        "train.seq_length=32",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_iters=0",
    ]
    args = {
        "pretrain": ["model=tiny-llama", f"tokenizer={tokenizer_dir}", *train],
        "correct": [f"load={llama_ckpt}", "original_lr=1e-3", *train],
        "evaluate": [
            f"load={llama_ckpt}",
            "seq_length=32",
            "iters=1",
            "global_batch_size=2",
            "micro_batch_size=2",
        ],
        "importance": [
            f"load={llama_ckpt}",
            "importance.num_samples=2",
            "importance.seq_length=32",
            "importance.micro_batch_size=2",
            "importance.layer_loss_samples=0",
        ],
    }[command]
    code, err = _one_error(capsys, command, *common, *args)
    assert code == 2 and "data.train" in err and "demo:stdlib-code" in err, err
    assert not (cache / "demo").exists()  # the demo corpus was not touched
