"""Two commits measured interleaved (A B A B ...) on the same machine and minute: phase B's emails/s and CPU per email.

    .venv/bin/python bench/compare.py A B [--rounds 2] [--mode auto|only|trim|ab] [--keep-logs] [-- <bench.py options>]
    make bench-compare A=HEAD~1 B=HEAD [ROUNDS=2] [ARGS="--emails 300"]

Each revision is checked out into a temporary git worktree (removed at the end, also on Ctrl-C) and runs
that worktree's own bench/bench.py, with this .venv's Python, cwd and PYTHONPATH the worktree (so its
code is imported, not this checkout's; checked before the first run). Every run starts a stack of its own
(bench.py makes its own temporary directory and database). A revision's bench.py is limited to phase B
with the options it has (`--mode auto` picks the first that fits, in this order):
  only  an option that runs phase B alone (`--phases BC`: C's line ends B; `--only B`, `--b-only`, `--throughput-only`);
  trim  the full run with the other phases emptied (`--steady-seconds 0`, `--scheduled 0`, a short D);
  ab    `--ab telemetry --pairs 1`, keeping the run with the feature off (twice the time).
CPU per process is read here from /proc over phase B (between bench.py's "B." line and the next phase's),
the same way for both revisions: every direct child of bench.py with its descendants, named by what it
runs (api, worker, temporal, sink; "bench", the load generator itself, is shown but not in the total).
When every run's JSON has bench.py's own per-process CPU for phase B, those are used instead (they also
count PostgreSQL's backends); each run keeps both in the JSON.

Prints one line per run, then per revision the median emails/s and CPU per email and the ratios B/A, and
writes everything to bench/results/compare-<A>-<B>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import proc_table  # bench/bench.py, beside this file (the current tree's, whatever revision is measured)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PHASE_LINE = re.compile(r"^([A-Z])\. ")
# "BC": C (raw SMTP, a second or two) prints the line that ends B for the CPU read here
ONLY_OPTIONS = (("--phases", "BC"), ("--only", "B"), ("--b-only", None), ("--throughput-only", None))


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "rev"


class Revision:
    """One revision checked out in a temporary worktree, and what its bench.py can do."""

    def __init__(self, label: str, rev: str, base: Path) -> None:
        self.label, self.rev = label, rev
        try:
            self.commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            raise SystemExit(f"not a commit: {rev}") from None
        self.path = base / f"{label}-{self.commit[:10]}"
        self.added = False
        self.options: set[str] = set()
        self.ab_choices: list[str] = []
        self.imports: dict[str, str] = {}

    def add(self) -> None:
        git("worktree", "add", "--detach", str(self.path), self.commit)
        self.added = True
        if not (self.path / "bench" / "bench.py").is_file():
            raise SystemExit(f"{self.rev} ({self.commit[:10]}) has no bench/bench.py")

    def remove(self) -> None:
        if self.added:
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=ROOT, capture_output=True)
            self.added = False

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return env | {"PYTHONPATH": str(self.path), "PYTHONUNBUFFERED": "1"}

    def check_imports(self) -> None:
        """`import mailqueue` (and the other top-level packages) must resolve inside the worktree, not to the
        editable install of this checkout."""
        code = ("import json, importlib; print(json.dumps({m: importlib.import_module(m).__file__ "
                "for m in ('mailqueue', 'devstack', 'workflows', 'activities', 'api')}))")
        out = subprocess.run([sys.executable, "-c", code], cwd=self.path, env=self.env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{self.rev}: importing its packages failed:\n{out.stderr[-2000:]}")
        files = json.loads(out.stdout.strip().splitlines()[-1])
        outside = {m: f for m, f in files.items() if not str(Path(f or "").resolve()).startswith(str(self.path.resolve()) + os.sep)}
        if outside:
            raise SystemExit(f"{self.rev}: imported from outside its worktree {self.path}: {outside}")
        self.imports = files

    def read_options(self) -> None:
        out = subprocess.run([sys.executable, "bench/bench.py", "--help"], cwd=self.path, env=self.env(),
                             capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        self.options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
        match = re.search(r"--ab \{([^}]*)\}", text)
        self.ab_choices = match.group(1).split(",") if match else []

    def mode(self, wanted: str) -> tuple[str, list[str]]:
        """The way to limit this revision's bench.py to phase B, and the options that do it."""
        modes: list[tuple[str, list[str]]] = []
        for option, value in ONLY_OPTIONS:
            if option in self.options:
                modes.append(("only", [option, *([value] if value else [])]))
                break
        if "--steady-seconds" in self.options:
            trim = ["--steady-seconds", "0"]
            if "--scheduled" in self.options:
                trim += ["--scheduled", "0"]
            if "--render-seconds" in self.options:
                trim += ["--render-seconds", "0.2"]
            modes.append(("trim", trim))
        feature = next((f for f in ("telemetry", "webhooks", "attachment") if f in self.ab_choices), None)
        if feature and "--pairs" in self.options:
            modes.append(("ab", ["--ab", feature, "--pairs", "1"]))
        for name, options in modes:
            if wanted in ("auto", name):
                return name, options
        raise SystemExit(f"{self.rev}: its bench.py has no way to run phase B {'' if wanted == 'auto' else 'as ' + wanted} "
                         f"(options: {sorted(self.options)})")


# --- CPU of a process tree, from /proc ------------------------------------------------------------


def role(pid: int) -> str:
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv if a]
    joined = " ".join(words)
    if "--sink" in words:
        return "sink"
    if "uvicorn" in joined:
        return "api"
    if any(Path(w).name == "temporal" for w in words[:1]) or "server start-dev" in joined:
        return "temporal"
    if any(Path(w).name == "worker.py" for w in words):
        return "worker"
    if any(Path(w).name == "floor.py" for w in words):
        return "floor-worker"
    return Path(words[1]).name if len(words) > 1 else Path(words[0]).name if words else "?"


def tree_cpu(root: int, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far of `root` ("bench") and of each of its direct children with all their descendants,
    summed by role. `names` caches each child's role (read while it runs)."""
    table = proc_table()
    owner: dict[int, str] = {}
    if root in table:
        owner[root] = "bench"
    for pid, (parent, _) in table.items():
        if parent == root:
            owner[pid] = names.setdefault(pid, role(pid))
    grew = True
    while grew:
        more = {pid: owner[parent] for pid, (parent, _) in table.items() if parent in owner and pid not in owner and pid != root}
        owner |= more
        grew = bool(more)
    totals: dict[str, float] = {}
    for pid, name in owner.items():
        totals[name] = totals.get(name, 0.0) + table[pid][1]
    return totals


# --- one run --------------------------------------------------------------------------------------


def find_b(data: Any) -> dict[str, Any] | None:
    """Phase B's result in a bench.py JSON: `throughput`, else the first run with the feature off, else the
    first dict holding emails_per_s and delivered."""
    if isinstance(data, dict):
        if isinstance(data.get("throughput"), dict):
            return data["throughput"]
        runs = data.get("runs")
        if isinstance(runs, list):
            off = [r for r in runs if isinstance(r, dict) and not r.get("on")]
            if off:
                return off[0]
        if "emails_per_s" in data and "delivered" in data:
            return data
        for value in data.values():
            found = find_b(value)
            if found:
                return found
    elif isinstance(data, list):
        for value in data:
            found = find_b(value)
            if found:
                return found
    return None


def run_once(rev: Revision, round_no: int, mode: list[str], bench_args: list[str], logs: Path) -> dict[str, Any]:
    out_json = logs / f"{rev.label}-{round_no}.json"
    log_path = logs / f"{rev.label}-{round_no}.log"
    cmd = [sys.executable, "bench/bench.py", *bench_args, *mode, "--json-out", str(out_json)]
    started = time.time()
    # A session of its own: Ctrl-C here does not reach it; it is stopped with SIGINT from here (its finally stops the stack).
    child = subprocess.Popen(cmd, cwd=rev.path, env=rev.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1, start_new_session=True)
    names: dict[int, str] = {}
    marks: dict[str, Any] = {}

    def reader() -> None:
        with log_path.open("w") as log:
            assert child.stdout is not None
            for line in child.stdout:
                log.write(line)
                log.flush()
                phase = PHASE_LINE.match(line)
                if phase and "cpu1" not in marks and "cpu0" in marks:
                    marks["cpu1"], marks["t1"] = tree_cpu(child.pid, names), time.time()
                if phase and phase.group(1) == "B" and "cpu0" not in marks:
                    marks["cpu0"], marks["t0"] = tree_cpu(child.pid, names), time.time()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        child.wait()
    except BaseException:
        stop(child)
        raise
    thread.join(10)
    result: dict[str, Any] = {"rev": rev.label, "commit": rev.commit, "round": round_no, "command": cmd,
                              "returncode": child.returncode, "seconds": round(time.time() - started, 1), "log": str(log_path)}
    b = find_b(json.loads(out_json.read_text())) if out_json.is_file() else None
    if child.returncode != 0 or b is None:
        tail = log_path.read_text().splitlines()[-15:] if log_path.is_file() else []
        result["error"] = "bench.py failed or wrote no phase B result:\n" + "\n".join(tail)
        return result
    observed = None
    if "cpu0" in marks and "cpu1" in marks:
        cpu0, cpu1 = marks["cpu0"], marks["cpu1"]
        observed = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in sorted(cpu1.items()) if k != "gone"}
        result["observed_seconds"] = round(marks["t1"] - marks["t0"], 2)
    own = b.get("cpu_by_process")
    result |= {
        "emails": b.get("emails"), "delivered": b.get("delivered"), "missing": b.get("missing"),
        "duplicates": b.get("duplicates"), "errors": b.get("errors"),
        "emails_per_s": b.get("emails_per_s"), "end_to_end_seconds": b.get("end_to_end_seconds"),
        "cpu_by_process_bench": own if isinstance(own, dict) and own else None, "cpu_by_process_observed": observed,
        "phase_b": b,
    }
    use_cpu(result, "observed" if observed else "bench.py")
    return result


def use_cpu(r: dict[str, Any], source: str) -> None:
    """Per-email CPU of a run from one source: "observed" (here, from /proc) or "bench.py" (the revision's own
    figures, which also count PostgreSQL's backends). Workers are summed (worker-0, worker-1 -> worker); the
    load generator ("bench") is shown but not in the total, as bench.py leaves it out."""
    by_process = r.get("cpu_by_process_observed" if source == "observed" else "cpu_by_process_bench")
    merged: dict[str, float] = {}
    for name, seconds in (by_process or {}).items():
        kind = re.sub(r"-\d+$", "", name)
        merged[kind] = merged.get(kind, 0.0) + seconds
    n = max(int(r.get("delivered") or 0), 1)
    r["cpu_source"] = source if by_process else None
    r["cpu_by_process"] = by_process
    r["cpu_ms_per_email"] = round(sum(v for k, v in merged.items() if k != "bench") * 1000 / n, 1) if by_process else None
    r["cpu_ms_per_email_by_process"] = {k: round(v * 1000 / n, 2) for k, v in sorted(merged.items())} if by_process else None


def stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGINT)  # bench.py's finally stops its stack
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def run_line(r: dict[str, Any]) -> str:
    head = f"{r['rev']} {r['commit'][:10]} round {r['round']}:"
    if r.get("error"):
        return f"{head} FAILED ({r['returncode']}): {r['error']}"
    per = ", ".join(f"{k} {v}" for k, v in sorted((r["cpu_ms_per_email_by_process"] or {}).items()))
    return (f"{head} {r['emails_per_s']} emails/s, {r['cpu_ms_per_email']} ms CPU per email ({per}; {r['cpu_source']}), "
            f"delivered {r['delivered']}, missing {r['missing']}, duplicates {r['duplicates']}, errors {r['errors'] or 0}")


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarise(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in labels:
        ok = [r for r in runs if r["rev"] == label and not r.get("error")]
        processes = sorted({k for r in ok for k in (r["cpu_ms_per_email_by_process"] or {})})
        out[label] = {
            "runs": len(ok), "failed": sum(1 for r in runs if r["rev"] == label and r.get("error")),
            "emails_per_s": median([r["emails_per_s"] for r in ok]),
            "cpu_ms_per_email": median([r["cpu_ms_per_email"] for r in ok]),
            "cpu_ms_per_email_by_process": {p: median([(r["cpu_ms_per_email_by_process"] or {}).get(p) for r in ok]) for p in processes},
        }
    a, b = out[labels[0]], out[labels[1]]

    def ratio(x: float | None, y: float | None) -> float | None:
        return round(y / x, 3) if x and y is not None else None

    out["ratio_b_over_a"] = {
        "emails_per_s": ratio(a["emails_per_s"], b["emails_per_s"]),
        "cpu_ms_per_email": ratio(a["cpu_ms_per_email"], b["cpu_ms_per_email"]),
        "cpu_ms_per_email_by_process": {p: ratio(a["cpu_ms_per_email_by_process"].get(p), v)
                                        for p, v in b["cpu_ms_per_email_by_process"].items()},
    }
    return out


def summary_lines(s: dict[str, Any], revs: list[Revision]) -> list[str]:
    lines = []
    for rev in revs:
        m = s[rev.label]
        per = ", ".join(f"{k} {v}" for k, v in m["cpu_ms_per_email_by_process"].items())
        lines.append(f"{rev.label} = {rev.rev} ({rev.commit[:10]}), median of {m['runs']} runs: {m['emails_per_s']} emails/s, "
                     f"{m['cpu_ms_per_email']} ms CPU per email ({per})" + (f"; {m['failed']} failed" if m["failed"] else ""))
    r = s["ratio_b_over_a"]
    per = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_email_by_process"].items())
    lines.append(f"B/A: emails/s {r['emails_per_s']}, CPU per email {r['cpu_ms_per_email']} ({per})")
    return lines


def load() -> dict[str, Any]:
    loadavg = Path("/proc/loadavg").read_text().split()
    return {"loadavg_1_5_15": [float(x) for x in loadavg[:3]], "at": datetime.now(UTC).isoformat(timespec="seconds")}


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    argv = sys.argv[1:]
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="revision A (the baseline), e.g. HEAD~1")
    parser.add_argument("b", help="revision B, e.g. HEAD")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, run A B A B ...")
    parser.add_argument("--mode", choices=["auto", "only", "trim", "ab"], default="auto", help="how to limit bench.py to phase B")
    parser.add_argument("--keep-logs", action="store_true", help="keep each run's log and JSON (their folder is printed)")
    args = parser.parse_args(argv)

    # SIGTERM ends like Ctrl-C: the finally below stops the running bench.py and removes the worktrees.
    signal.signal(signal.SIGTERM, interrupted)
    base = Path(tempfile.mkdtemp(prefix="mailqueue-compare-"))
    logs = base / "runs"
    logs.mkdir()
    revs: list[Revision] = []
    runs: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    modes: dict[str, dict[str, Any]] = {}
    try:
        revs += [Revision("A", args.a, base), Revision("B", args.b, base)]
        for rev in revs:
            rev.add()
            rev.check_imports()
            rev.read_options()
            name, options = rev.mode(args.mode)
            modes[rev.label] = {"mode": name, "options": options}
            print(f"{rev.label} = {rev.rev} ({rev.commit[:10]}) in {rev.path}: phase B via {name} {' '.join(options)}", flush=True)
        print(f"bench.py options: {' '.join(bench_args) or '(defaults)'}; {args.rounds} rounds, A B interleaved", flush=True)
        for round_no in range(1, args.rounds + 1):
            for rev in revs:
                before = load()
                result = run_once(rev, round_no, modes[rev.label]["options"], bench_args, logs)
                result["load_before"] = before
                runs.append(result)
                print(run_line(result) + f"  [load before {before['loadavg_1_5_15'][0]}, {result['seconds']} s]", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: summarising the runs so far", flush=True)
    finally:
        for rev in revs:
            rev.remove()
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        if not args.keep_logs:
            subprocess.run(["rm", "-rf", str(base)])
    if not runs:
        raise SystemExit("no runs")
    ok = [r for r in runs if not r.get("error")]
    # One source for every run, so that A and B are measured alike: the revisions' own figures only when all have them.
    source = "bench.py" if ok and all(r["cpu_by_process_bench"] for r in ok) else "observed"
    for r in ok:
        use_cpu(r, source)
    summary = summarise(runs, ["A", "B"])
    summary["cpu_source"] = source
    print()
    print(f"CPU per email from {summary['cpu_source']} figures (total without the load generator, 'bench')")
    for line in summary_lines(summary, revs):
        print(line)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"compare-{safe(args.a)}-{safe(args.b)}-{stamp}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "revisions": {r.label: {"rev": r.rev, "commit": r.commit, **modes.get(r.label, {}), "imports": r.imports} for r in revs},
        "rounds": args.rounds, "bench_args": bench_args, "runs": runs, "summary": summary,
    }, indent=2) + "\n")
    print(f"\nfull results: {out}" + (f"; logs in {logs}" if args.keep_logs else ""))


if __name__ == "__main__":
    main()
