"""Fault injection: kill every stage at seeded random moments, re-run, compare bitwise; write the
table into tests/reliability/README.md.

    OMP_NUM_THREADS=1 python3 tests/reliability/run_faults.py                 # >= 10 per stage
    OMP_NUM_THREADS=1 python3 tests/reliability/run_faults.py --fast          # the CI subset
    python3 tests/reliability/run_faults.py --only correct,prune --per-stage 4 --no-write

The table goes between the ``<!-- faults:begin -->`` / ``<!-- faults:end -->`` markers; the rest
of the README (the catalogue's section) is left as it is. The last line printed is a JSON
summary. Exit status 1 if any case failed (known defects included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from faults import BY_NAME, STAGES, FaultShared, draw_kills, reference, run_kill  # noqa: E402
from run_catalogue import write_readme  # noqa: E402

README = os.path.join(HERE, "README.md")
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"

# The CI subset: the stages and the number of SIGKILL / SIGTERM cases of each.
FAST = {  # (kills, SIGTERMs) per stage in CI: one each (CI stays under its 30 minutes; the
    # SIGTERMs of training are tested in tests/test_training.py, the rest is the slow set's)
    "import-hf": (1, 0),
    "correct": (1, 0),  # + the kills at save points in tests/test_checkpoint_safety.py
    "correct-2ranks": (1, 0),  # the first 2-rank case kills at a fault point of one rank
    "importance": (1, 0),
    "prune": (1, 0),
    "distill": (1, 0),
    "export-hf": (1, 0),
}


def plan(args) -> list[tuple[str, int, int]]:
    names = args.only.split(",") if args.only else [s.name for s in STAGES]
    out = []
    for n in names:
        if args.fast:
            if n not in FAST:
                continue
            kills, terms = FAST[n]
        else:
            kills, terms = args.per_stage, max(2, args.per_stage // 3)
        out.append((BY_NAME[n].name, kills, terms))
    return out


def _cell(text: str, limit: int = 160) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exit(code) -> str:
    if code is None:
        return "-"
    return f"killed ({-code})" if code < 0 else str(code)


def table(outcomes, refs, fast: bool, seed: int, seconds: float, root: str = "") -> str:
    passed = sum(o.ok for o in outcomes)
    lines = [
        f"{len(outcomes)} cases ({'fast subset' if fast else 'full run'}, seed {seed}), "
        f"{passed} pass, {seconds:.0f} s on this machine (2 CPU cores, shared with other jobs). "
        "Written by `tests/reliability/run_faults.py`.",
        "",
        "| stage | reference run | fault points |",
        "|---|---|---|",
    ]
    for name, ref in refs.items():
        lines.append(f"| `{name}` | {ref.seconds:.1f} s | {len(ref.points)} |")
    lines += [
        "",
        "| stage | kill | moment | exit after the kill | presented as complete after the kill "
        "| nothing incomplete read as complete | re-run exit | bitwise equal | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        k = o.kill
        rerun = _exit(o.rerun_code) + (f" ({o.rerun_note})" if o.rerun_note else "")
        verdict = "yes" if o.ok else "**no**: " + "; ".join(o.problems)
        if root:
            verdict = verdict.replace(root, "$TMP")
        lines.append(
            f"| `{k.stage}` | {k.kind} | {_cell(k.moment)} | {_exit(o.killed_code)} "
            f"| {'yes' if o.complete_after_kill else 'no'} "
            f"| {'yes' if o.incomplete_ok else '**no**'} "
            f"| {rerun} | {'yes' if o.equal else '**no**'} | {_cell(verdict, 300)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-stage", type=int, default=10, help="SIGKILL cases per stage")
    ap.add_argument("--fast", action="store_true", help="the CI subset")
    ap.add_argument("--only", default="", help="comma-separated stages")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave the README")
    ap.add_argument("--keep", default="", help="work directory to keep (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    root = args.keep or tempfile.mkdtemp(prefix="minitron-faults-")
    t0, outcomes, refs = time.time(), [], {}
    try:
        shared = FaultShared(os.path.join(root, "shared"))
        for name, n, n_term in plan(args):
            stage = BY_NAME[name]
            ref = reference(stage, shared, os.path.join(root, name, "ref"))
            refs[name] = ref
            print(
                f"ref  {name:<18} {ref.seconds:5.1f}s  {len(ref.points)} fault points", flush=True
            )
            for i, kill in enumerate(draw_kills(stage, ref, n, n_term, args.seed)):
                o = run_kill(stage, ref, kill, shared, os.path.join(root, name, f"case{i}"))
                outcomes.append(o)
                mark = "ok  " if o.ok else "FAIL"
                print(
                    f"{mark} {name:<18} {kill.kind:<8} {kill.moment:<48} exit {o.killed_code:>4} "
                    f"rerun {o.rerun_code} {o.rerun_note} {o.seconds:5.1f}s {o.problems}",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.time() - t0
    text = table(outcomes, refs, args.fast, args.seed, seconds, root)
    if args.no_write or args.only:
        print(text)
    else:
        write_readme(text, BEGIN, END)
        print(f"wrote the table to {README}")
    summary = {
        "cases": len(outcomes),
        "passed": sum(o.ok for o in outcomes),
        "failed": [f"{o.kill.stage}:{o.kill.kind}:{o.kill.moment}" for o in outcomes if not o.ok],
        "per_stage": {n: sum(o.kill.stage == n for o in outcomes) for n in refs},
        "seed": args.seed,
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
