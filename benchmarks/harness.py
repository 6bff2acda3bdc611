"""What every benchmark script here shares: running a variant in a fresh process (or under
``torch.distributed.run``) and measuring its wall time and peak RSS, timing steps in this
process, medians over repeats, the machine's load, common flags, and printing tables or
writing a README section. The scripts define only their variants and what they measure.

Not a script: ``sys.path.insert(0, benchmarks/)`` and ``import harness`` (the scripts do).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB, MiB = 2**30, 2**20
POLL_SECONDS = 0.05  # the process-tree RSS sampling of ``measure``
TIME_BIN = "/usr/bin/time"
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# ------------------------------------------------------------------------ memory of processes


def tree_rss(pid: int) -> list[int]:
    """RSS in bytes (the kernel's VmRSS) of ``pid`` and of each of its descendants, ``pid``
    first; ``[]`` once ``pid`` is gone, 0 for a descendant gone while it was read."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            out.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            out.append(0)
    return out


class Poller:
    """Calls ``fn()`` at once and then every ``interval`` seconds on a daemon thread while the
    ``with`` block runs."""

    def __init__(self, interval: float, fn):
        self.interval, self.fn, self.done = interval, fn, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.done.is_set():
            self.fn()
            self.done.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))


class PeakRSS:
    """Peak resident memory of this process while the block runs, above its level at entry:
    ``.peak``, ``.base`` (bytes) and ``.method``."""

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method, self.poller = "VmHWM after clear_refs", None
        except OSError:
            self.method = "psutil RSS sampled every 2 ms"
        self.base = self.top = _status_bytes("VmRSS")
        if self.method.startswith("psutil"):
            import psutil

            proc = psutil.Process()

            def sample():
                self.top = max(self.top, proc.memory_info().rss)

            self.poller = Poller(0.002, sample).__enter__()
        return self

    def __exit__(self, *exc):
        if self.poller is None:
            top = _status_bytes("VmHWM")
        else:
            self.poller.__exit__()
            top = max(self.top, _status_bytes("VmRSS"))
        self.peak = top - self.base


# ------------------------------------------------------------------- a variant, fresh process


@dataclass
class Run:
    """One measured subprocess."""

    name: str
    wall_s: float
    peak_rss_bytes: int  # /usr/bin/time's max RSS if available, else the sampled tree sum
    sampled_tree_rss_bytes: int  # an upper bound: forked children's shared pages count twice
    max_procs: int  # most processes seen at once in the measured tree
    rss_method: str
    returncode: int
    inner_s: float | None = None  # the process's own timing (imports excluded), if reported
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)


def parse_time_v(text: str) -> int | None:
    """Max RSS in bytes from ``/usr/bin/time -v`` output (reported in KiB)."""
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    return int(m.group(1)) * 1024 if m else None


def last_json_line(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (a command's metrics line)."""
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def measure(name: str, cmd: list[str], time_file: str) -> Run:
    """Run ``cmd`` to completion: wall time (interpreter start included), peak RSS (the
    kernel's, through ``/usr/bin/time -v`` writing ``time_file``, where that tool exists) and
    the RSS summed over its process tree every ``POLL_SECONDS``."""
    use_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-v", "-o", time_file, *cmd] if use_time else cmd
    wrapper = 1 if use_time else 0  # /usr/bin/time itself is not counted as a process
    top = {"rss": 0, "procs": 0}

    def sample():
        rss = tree_rss(popen.pid)
        top["rss"], top["procs"] = max(top["rss"], sum(rss)), max(top["procs"], len(rss) - wrapper)

    t0 = time.perf_counter()
    popen = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Poller(POLL_SECONDS, sample):
        stdout, stderr = popen.communicate()
        wall = time.perf_counter() - t0
    kernel_peak = None
    if use_time and os.path.isfile(time_file):
        with open(time_file) as f:
            kernel_peak = parse_time_v(f.read())
        os.remove(time_file)
    return Run(
        name=name,
        wall_s=wall,
        peak_rss_bytes=kernel_peak if kernel_peak is not None else top["rss"],
        sampled_tree_rss_bytes=top["rss"],
        max_procs=top["procs"],
        rss_method="/usr/bin/time -v" if kernel_peak is not None else "psutil tree sum, 50 ms",
        returncode=popen.returncode,
        inner_s=(last_json_line(stdout) or {}).get("seconds"),
        stdout=stdout,
        stderr=stderr,
    )


def measure_ok(name: str, cmd: list[str], time_file: str) -> Run:
    """``measure``; a failed command ends this script (``fail``)."""
    run = measure(name, cmd, time_file)
    if run.returncode != 0:
        fail(run, cmd)
    return run


def fail(run: Run, cmd: list[str], tail_lines: int = 40) -> None:
    print(f"\nerror: {run.name} failed with exit status {run.returncode}", file=sys.stderr)
    print("command: " + " ".join(cmd), file=sys.stderr)
    print(f"--- last {tail_lines} lines of its stderr ---", file=sys.stderr)
    print("\n".join(run.stderr.rstrip().splitlines()[-tail_lines:]), file=sys.stderr)
    sys.exit(run.returncode or 1)


def median_of(rows: list, key: str) -> float | None:
    """Median of ``key`` (a dict key or an attribute) over ``rows``, Nones left out."""
    values = [r[key] if isinstance(r, dict) else getattr(r, key) for r in rows]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(rs: list[Run]) -> dict:
    """Medians of the measured runs of one variant, and each run's figures."""
    return {
        "wall_s": round(median_of(rs, "wall_s"), 3),
        "inner_s": median_of(rs, "inner_s"),
        "peak_rss_bytes": int(median_of(rs, "peak_rss_bytes")),
        "sampled_tree_rss_bytes": int(median_of(rs, "sampled_tree_rss_bytes")),
        "runs": [
            {k: v for k, v in asdict(r).items() if k not in ("stdout", "stderr", "name")}
            for r in rs
        ],
    }


# ------------------------------------------------- a variant, this script as a worker process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_cmd(nproc: int = 1) -> list[str]:
    """This interpreter, under ``torch.distributed.run`` with ``nproc`` ranks when > 1."""
    if nproc == 1:
        return [sys.executable]
    run = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    return [sys.executable, *run, f"--master-port={free_port()}"]


def run_worker(script: str, job: dict, nproc: int = 1, echo: bool = False) -> dict:
    """``script --worker JOB_FILE`` on ``nproc`` ranks (``worker_main`` there writes each
    rank's result): ``{"ok": True, "ranks": [result of each rank]}`` or ``{"ok": False,
    "error": ...}``; ``echo`` prints the worker's stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        cmd = [*python_cmd(nproc), script, "--worker", path]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if echo:
            print(r.stdout, flush=True)
        outs = [os.path.join(tmp, f"out.{i}.json") for i in range(nproc)]
        if r.returncode != 0 or not all(os.path.exists(p) for p in outs):
            tail = (r.stderr or r.stdout)[-3000:]
            print(f"worker failed ({r.returncode}):\n{tail}", flush=True)
            return {"ok": False, "error": tail[-500:]}
        ranks = []
        for p in outs:
            with open(p) as f:
                ranks.append(json.load(f))
        return {"ok": True, "ranks": ranks}


def worker_main(path: str, fn) -> None:
    """In the worker: ``fn(job)`` of the job file at ``path``, written for ``run_worker``."""
    with open(path) as f:
        job = json.load(f)
    out = fn(job)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.path.dirname(path), f"out.{rank}.json"), "w") as f:
        json.dump(out, f)


def guarded(fn, *a) -> dict:
    """``fn(*a)``, or ``{"ok": False, "error": ...}`` if it raises (the traceback printed): a
    failed variant is reported, not fatal."""
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001
        print(traceback.format_exc(), flush=True)
        return {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:500]}


# ------------------------------------------------------------------- a variant, this process


class Clock:
    """Wall and process CPU seconds (all threads) since it was made. CPU time is less
    sensitive than wall time to other processes competing for the cores."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def cpu(self) -> float:
        return time.process_time() - self.c0


def timed_steps(steps: dict, batches: list, warmup: int, sync=None) -> dict:
    """Every function of ``steps`` (name -> fn(batch) -> loss) on each batch in turn, the order
    alternating per batch; the first ``warmup`` batches untimed. ``sync`` (a GPU's
    synchronize) ends every step, so a step's time includes the device work it queued.
    Returns ``{name: {"step_s": [...], "cpu_s": [...], "losses": [every step's]}}``."""
    sync = sync or (lambda: None)
    out = {n: {"step_s": [], "cpu_s": [], "losses": []} for n in steps}
    for i, batch in enumerate(batches):
        for n in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            clock = Clock()
            out[n]["losses"].append(float(steps[n](batch)))
            sync()
            if i >= warmup:
                out[n]["step_s"].append(clock.wall())
                out[n]["cpu_s"].append(clock.cpu())
    return out


# ------------------------------------------------------------------------- the machine's load


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat; None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def load_note(when: str) -> dict:
    """Print how busy the machine is while this process sleeps for a second (i.e. the share of
    the CPUs other processes use) and the load average; warn when others compete for the
    cores. The 1-minute load average lags by about a minute, so the sampled share decides the
    warning."""
    import torch

    threads = torch.get_num_threads()
    load = list(os.getloadavg())
    a = _cpu_times()
    time.sleep(1.0)
    b = _cpu_times()
    others = None
    if a and b and b[1] > a[1]:
        others = (b[0] - a[0]) / (b[1] - a[1])
    busy = others > 0.1 if others is not None else load[0] > threads + 0.5
    warn = "  WARNING: other processes compete for the cores; figures not comparable"
    warn = warn if busy else ""
    share = f"{others:.0%}" if others is not None else "n/a"
    print(
        f"machine {when}: CPU used by others {share}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{warn}",
        flush=True,
    )
    return {"others_cpu_share": others, "loadavg": load, "contended": busy}


def load_before() -> float:
    """The 1-min load average, with a note when other work will skew the timings."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: 1-min load average is {load:.2f}; other work skews the timings")
    return load


def load_after(before: float) -> float:
    """The 1-min load average now, printed next to ``before``."""
    after = os.getloadavg()[0]
    print(f"1-min load average: {before:.2f} before, {after:.2f} after")
    return after


def host_info(before: float, after: float | None = None) -> dict:
    """The JSON line's description of the run: when, where, how loaded."""
    out = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "loadavg_1min_before": round(before, 2),
        "python": platform.python_version(),
    }
    if after is not None:
        out["loadavg_1min_after"] = round(after, 2)
    return out


# ------------------------------------------------------------------------------------- flags


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by its docstring's first line."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def csv(s: str) -> list[str]:
    """The items of a comma list, blanks dropped."""
    return [x.strip() for x in s.split(",") if x.strip()]


def add_runs_args(p, repeats_help: str, repeats: int = 1, keep_help: str | None = None) -> None:
    """``--work-dir`` (the model cache), ``--repeats`` and, with ``keep_help``, ``--keep``."""
    p.add_argument("--work-dir", default="/tmp/minitron_bench", help="model cache and outputs")
    p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    if keep_help:
        p.add_argument("--keep", action="store_true", help=keep_help)


def add_seeds(p, help: str | None = None) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help=help)


def log(msg: str) -> None:
    """Progress, on stderr: stdout ends with the JSON line."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- reporting


def fixed_table(row: str, titles: dict, rows: list, rule: bool = False) -> str:
    """A fixed-width table: ``row`` is a ``str.format`` template with one named field per
    column (``"{side:<13}{tps:>10.0f}"``), ``titles`` the header of each, formatted to the
    same widths; ``rule`` draws a line of dashes under the header. A row is a dict of the
    fields, or a string printed as it is (a failed variant)."""
    header = re.sub(r"\{(\w+):([<>^]?\d*)[^}]*\}", r"{\1:\2}", row).format(**titles)
    lines = [header] + (["-" * len(header)] if rule else [])
    lines += [r if isinstance(r, str) else row.format(**r) for r in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list], align: str) -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def replace_section(text: str, begin: str, end: str, path: str) -> None:
    """Replace what stands between the ``begin`` and ``end`` markers of ``path`` with ``text``."""
    with open(path) as f:
        readme = f.read()
    if begin not in readme or end not in readme:
        raise SystemExit(f"{path} has no {begin} ... {end} section to write")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
