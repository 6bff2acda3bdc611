"""Re-running a command whose output is complete is a no-op; other content in save= is refused.

A scheduler that restarts a job killed after its output was put in place (while it wrote
metrics.json, or shut down) must see it finish: exit 0, output untouched. The same save= with
another command, other options or a changed input is refused as before, output untouched.
"""

import hashlib
import json
import os

from minitron_mcore.cli import main


def tree_digest(path: str) -> str:
    """Names and bytes of every file under ``path``, except the metrics the re-run reports."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            if name == "metrics.json":
                continue
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), err.strip()


def refused(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "already exists" in err and "overwrite=true" in err, err


def check_noop(capsys, out: str, *argv):
    """``argv`` (which wrote ``out``) again: exit 0, reported as skipped, nothing changed;
    also after metrics.json was lost (a kill right after the output was put in place)."""
    before = tree_digest(out)
    for lose_metrics in (False, True):
        if lose_metrics:
            os.remove(os.path.join(out, "metrics.json"))
        code, metrics, err = run(capsys, *argv)
        assert code == 0, err
        assert metrics["skipped"] == "already complete" and metrics["save"] == out, metrics
        assert "nothing to do" in err
        assert tree_digest(out) == before
        assert os.path.isfile(os.path.join(out, "metrics.json"))


def test_import_hf_rerun(capsys, hf_models, tmp_path):
    out = str(tmp_path / "ckpt")
    argv = ("import-hf", f"load={hf_models['llama']}", f"save={out}", "dtype=fp32")
    assert run(capsys, *argv)[0] == 0
    check_noop(capsys, out, *argv)
    before = tree_digest(out)
    refused(capsys, "import-hf", f"load={hf_models['llama']}", f"save={out}", "dtype=bf16")
    refused(capsys, "import-hf", f"load={hf_models['qwen2']}", f"save={out}", "dtype=fp32")
    assert tree_digest(out) == before


def test_import_hf_rerun_after_the_source_changed(capsys, hf_models, tmp_path):
    """A re-downloaded (rewritten) source file is another input: refused, not skipped."""
    import shutil

    src = str(tmp_path / "src")
    shutil.copytree(hf_models["llama"], src)
    out = str(tmp_path / "ckpt")
    argv = ("import-hf", f"load={src}", f"save={out}", "dtype=fp32")
    assert run(capsys, *argv)[0] == 0
    weights = [n for n in os.listdir(src) if n.endswith(".safetensors")][0]
    st = os.stat(os.path.join(src, weights))
    os.utime(os.path.join(src, weights), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    refused(capsys, *argv)


def test_prune_and_importance_rerun(capsys, llama_ckpt, corpora, tmp_path):
    scores = str(tmp_path / "scores")
    data = f"data.train=[{corpora['stdlib-code']}]"
    imp = ("importance", f"load={llama_ckpt}", f"save={scores}", data)
    imp += ("importance.num_samples=2", "importance.micro_batch_size=2", "importance.seq_length=16")
    imp += ("importance.layer_loss_samples=2", f"data.cache_dir={tmp_path}/cache")
    code, _, err = run(capsys, *imp)
    assert code == 0, err
    check_noop(capsys, scores, *imp)
    refused(capsys, *imp[:-3], "importance.seq_length=8", *imp[-2:])
    refused(capsys, *imp[:3], f"data.train=[{corpora['stdlib-docs']}]", *imp[4:])

    out = str(tmp_path / "pruned")
    argv = ("prune", f"load={llama_ckpt}", f"scores={scores}", f"save={out}")
    argv += ("prune.target.ffn_hidden_size=32",)
    assert run(capsys, *argv)[0] == 0
    check_noop(capsys, out, *argv)
    refused(capsys, *argv[:-1], "prune.target.ffn_hidden_size=16")
    # The output of one command is never taken for another's.
    refused(capsys, "export-hf", f"load={llama_ckpt}", f"save={out}")


def test_export_hf_rerun(capsys, llama_ckpt, tmp_path):
    out = str(tmp_path / "hf")
    argv = ("export-hf", f"load={llama_ckpt}", f"save={out}", "dtype=auto")
    assert run(capsys, *argv)[0] == 0
    with open(os.path.join(out, "minitron_export.json")) as f:
        info = json.load(f)
    assert set(info) == {"source_checkpoint_id", "dtype", "fingerprint"}
    assert "/" not in json.dumps(info)  # no machine path in a file that gets published
    check_noop(capsys, out, *argv)
    refused(capsys, *argv[:-1], "dtype=bf16")
