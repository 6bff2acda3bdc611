"""Run the bad-input catalogue and write its table into tests/reliability/README.md.

    OMP_NUM_THREADS=1 python3 tests/reliability/run_catalogue.py          # every case
    OMP_NUM_THREADS=1 python3 tests/reliability/run_catalogue.py --fast   # the CI subset
    python3 tests/reliability/run_catalogue.py --only nan-loss,hf-moe-fields --no-write

The table goes between the ``<!-- catalogue:begin -->`` / ``<!-- catalogue:end -->`` markers;
the rest of the README (e.g. the fault-injection section) is left as it is. Exit status 1 if
any case failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks"))

from catalogue import BY_ID, CASES, Shared, run_case  # noqa: E402
from harness import replace_section  # noqa: E402  (benchmarks/harness.py)

README = os.path.join(HERE, "README.md")
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(results, fast: bool, seconds: float, root: str = "") -> str:
    passed = sum(r.ok for r in results)
    lines = [
        f"{len(results)} cases ({'fast subset' if fast else 'full catalogue'}), {passed} pass, "
        f"{seconds:.0f} s on this machine. Written by `tests/reliability/run_catalogue.py`.",
        "",
        "| case | bad input | ranks | expected in `error:` | seen `error:` line | outputs intact "
        "| pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.case
        seen = r.seen or ("(none) " + "; ".join(r.problems))
        if root:  # the run's temporary directory says nothing; keep the table readable
            seen = seen.replace(root, "$TMP")
        verdict = "yes" if r.ok else "**no**: " + "; ".join(r.problems)
        if not r.ok and c.xfail:
            verdict = f"known defect: {c.xfail}"
        lines.append(
            f"| `{c.id}` | {_cell(c.what)} | {c.nproc} | `{_cell(c.expect)}` | {_cell(seen, 220)} "
            f"| {'yes' if r.intact else '**no**'} | {_cell(verdict)} |"
        )
    return "\n".join(lines)


def write_readme(text: str, begin: str = BEGIN, end: str = END, path: str = README) -> None:
    """Replace the section between the ``begin`` and ``end`` markers of ``path`` with ``text``
    (the catalogue's by default; run_faults.py writes its table through this too)."""
    replace_section(text, begin, end, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the cases not marked slow")
    ap.add_argument("--only", default="", help="comma-separated case ids")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave the README")
    ap.add_argument("--keep", default="", help="work directory to keep (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    cases = [BY_ID[i] for i in args.only.split(",")] if args.only else CASES
    cases = [c for c in cases if not (args.fast and c.slow)]
    root = args.keep or tempfile.mkdtemp(prefix="minitron-catalogue-")
    t0, results = time.time(), []
    try:
        shared = Shared(os.path.join(root, "shared"))
        for c in cases:
            r = run_case(c, shared, os.path.join(root, "cases", c.id))
            results.append(r)
            mark = "ok  " if r.ok else "FAIL"
            print(f"{mark} {c.id:<34} {r.seconds:5.1f}s  {r.seen or r.problems}", flush=True)
            if not r.ok:
                print("     " + "\n     ".join(r.stderr.strip().splitlines()[-6:]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = table(results, args.fast, time.time() - t0, root)
    if args.no_write or args.only:
        print(text)
    else:
        write_readme(text)
        print(f"wrote the table to {README}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
