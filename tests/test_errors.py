"""Bad input gets one line that names the fix, a non-zero exit, and leaves outputs alone."""

import json
import os
import shutil

import pytest
from conftest import minitron

from minitron_mcore.checkpoint.megatron import resolve_checkpoint
from minitron_mcore.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(code, err, *needles):
    assert code != 0
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_unknown_config_key(capsys):
    one_line_error(
        *run(capsys, "import-hf", "load=x", "save=y", "paralel.tp=2"), "unknown key 'paralel.tp'"
    )
    one_line_error(*run(capsys, "export-hf", "lod=x"), "unknown key 'lod'")


def test_bad_value_type(capsys):
    one_line_error(*run(capsys, "import-hf", "parallel.tp=two"), "parallel.tp=two")


def test_unknown_command(capsys):
    code, err = run(capsys, "prune-everything")
    one_line_error(code, err, "minitron --help")


def test_missing_checkpoint_dir(capsys, tmp_path):
    one_line_error(
        *run(capsys, "export-hf", f"load={tmp_path}/nope", f"save={tmp_path}/out"),
        "does not exist",
        "load=",
    )
    one_line_error(
        *run(capsys, "import-hf", f"load={tmp_path}/nope", f"save={tmp_path}/out"), "does not exist"
    )


def test_hf_dir_given_as_checkpoint(capsys, hf_models, tmp_path):
    one_line_error(
        *run(capsys, "export-hf", f"load={hf_models['llama']}", f"save={tmp_path}/o"),
        "minitron import-hf",
    )


def test_unsupported_model_type(capsys, hf_models, tmp_path):
    src = str(tmp_path / "gpt2")
    shutil.copytree(hf_models["llama"], src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    one_line_error(
        *run(capsys, "import-hf", f"load={src}", f"save={tmp_path}/o"),
        "'gpt2' is not supported",
        "llama",
        "qwen2",
    )


@pytest.mark.parametrize("tp,needle", [(3, "num_attention_heads=4"), (4, "num_query_groups=2")])
def test_tp_must_divide_heads_and_groups(capsys, hf_models, tmp_path, tp, needle):
    one_line_error(
        *run(
            capsys,
            "import-hf",
            f"load={hf_models['llama']}",
            f"save={tmp_path}/o",
            f"parallel.tp={tp}",
        ),
        f"parallel.tp={tp}",
        needle,
    )


def test_corrupt_safetensors_keeps_existing_output(capsys, hf_models, tmp_path):
    src = str(tmp_path / "corrupt")
    shutil.copytree(hf_models["llama"], src)
    weights = os.path.join(src, "model.safetensors")
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 64)  # clobber the header length and JSON header
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    one_line_error(
        *run(capsys, "import-hf", f"load={src}", f"save={existing}", "overwrite=true"),
        "corrupt safetensors file",
        "re-download",
    )
    assert (existing / "keep.txt").read_text() == "precious"
    assert not os.path.exists(str(existing) + ".partial")


def test_existing_output_needs_overwrite(capsys, hf_models, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    one_line_error(
        *run(capsys, "import-hf", f"load={hf_models['llama']}", f"save={existing}"),
        "already exists",
        "overwrite=true",
    )


def test_corrupt_megatron_checkpoint(capsys, hf_models, tmp_path):
    """A damaged checkpoint fails export with one line; the old export stays as it was."""
    ckpt = str(tmp_path / "ckpt")
    minitron("import-hf", f"load={hf_models['qwen2']}", f"save={ckpt}")
    weights = os.path.join(resolve_checkpoint(ckpt), "weights")
    for name in os.listdir(weights):
        if name.endswith(".distcp"):
            with open(os.path.join(weights, name), "r+b") as f:
                f.truncate(100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    one_line_error(
        *run(capsys, "export-hf", f"load={ckpt}", f"save={out}", "overwrite=true"),
        "corrupt or incomplete",
    )
    assert (out / "keep.txt").read_text() == "precious"
    assert not os.path.exists(str(out) + ".partial")


def test_console_script_exit_code(tmp_path):
    """The real process: non-zero exit and a single stderr line, no traceback."""
    r = minitron("export-hf", f"load={tmp_path}/missing", f"save={tmp_path}/o", check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
