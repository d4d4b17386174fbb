#!/usr/bin/env python3
"""Mutation score of the core modules with mutmut (https://github.com/boxed/mutmut).

mutmut changes one small thing at a time in the modules below (an operator, a constant, a
comparison, a removed call...) and runs the unit tests of those modules against each mutant; a
mutant that no test fails on "survives" and points at behaviour the tests do not pin down.

    pip install mutmut==3.8.1
    python benchmarks/mutation_score.py                     # the six core modules, 2 processes
    python benchmarks/mutation_score.py --modules sde normalize --max-children 2

The run happens in a scratch copy of the package and tests (``--work``, default a temporary folder)
with its own ``setup.cfg``, so the checkout is left alone. Prints, per module and overall, the
mutants killed / survived / timed out / not covered, the score (killed + timeout) / all mutants that
were tested, and the survivors (``mutmut show NAME`` in the work folder shows a survivor's diff with
``--keep``); writes ``mutation_score.json`` and ``mutation_score.md`` into ``--out``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["sde", "losses", "precond", "sampling", "normalize", "frontend"]
# the fast unit tests of those modules: each module's own test file
TESTS = ["test_sde.py", "test_losses.py", "test_precond.py", "test_sampling.py", "test_normalize.py",
         "test_frontend.py"]
KILLED = {"killed", "timeout"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="+", default=MODULES, help="modules of speechbrain_diffsep to mutate")
    p.add_argument("--tests", nargs="+", default=TESTS, help="test files (in tests/) to run against mutants")
    p.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (mutmut --max-children)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation_score")
    return p.parse_args(argv)


def prepare(work, modules, tests):
    """Copy the package and tests into ``work`` and write mutmut's configuration there."""
    shutil.copytree(ROOT / "speechbrain_diffsep", work / "speechbrain_diffsep",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", work / "tests")
    shutil.copy(ROOT / "tests" / "helpers.py", work / "tests")  # shared test helpers (from helpers import ...)
    shutil.copytree(ROOT / "tests" / "data", work / "tests" / "data")
    existing = [t for t in tests if (ROOT / "tests" / t).is_file()]
    for t in existing:
        shutil.copy(ROOT / "tests" / t, work / "tests")
    # pretrained/ is read by a few tests (the bundled model in test_sync_free)
    shutil.copytree(ROOT / "pretrained", work / "pretrained")
    cfg = ["[mutmut]", "source_paths=speechbrain_diffsep", "only_mutate="]
    cfg += [f"    speechbrain_diffsep/{m}.py" for m in modules]
    cfg += ["pytest_add_cli_args_test_selection="] + [f"    tests/{t}" for t in existing]
    cfg += ["pytest_add_cli_args=", "    -q", "    -x", "    -p", "    no:cacheprovider", "also_copy=", "    pretrained",
            "use_git_change_detection=False", ""]
    (work / "setup.cfg").write_text("\n".join(cfg), encoding="utf-8")
    return existing


def collect(work):
    """``{mutant name: status}`` from ``mutmut results --all true``."""
    proc = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                          capture_output=True, text=True)
    status = {}
    for line in proc.stdout.splitlines():
        name, sep, st = line.strip().rpartition(": ")
        if sep and name:
            status[name] = st.strip()
    if not status:
        raise RuntimeError("mutmut results printed nothing:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    return status


def module_of(name):
    # mutant names look like speechbrain_diffsep.sde.xǁMixingSDEǁmean__mutmut_3
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else parts[0]


def summarize(status, modules):
    per = defaultdict(Counter)
    for name, st in status.items():
        per[module_of(name)][st] += 1
    rows = []
    for m in modules + ["all"]:
        c = sum(per.values(), Counter()) if m == "all" else per.get(m, Counter())
        tested = sum(n for s, n in c.items() if s not in ("no tests", "skipped", "not checked"))
        killed = sum(c[s] for s in KILLED)
        rows.append({"module": m, "mutants": sum(c.values()), "killed": c["killed"], "timeout": c["timeout"],
                     "survived": c["survived"], "no_tests": c["no tests"], "other": {k: v for k, v in c.items()
                     if k not in ("killed", "timeout", "survived", "no tests")},
                     "score": round(100.0 * killed / tested, 1) if tested else None})
    return rows


def write_report(rows, survivors, seconds, out, tests):
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Mutation score (mutmut), {time.strftime('%Y-%m-%d')}", "",
             f"`python benchmarks/mutation_score.py` in {seconds / 60:.1f} minutes; tests: "
             + ", ".join(f"`{t}`" for t in tests) + ".", "",
             "| module | mutants | killed | timeout | survived | no tests | score (%) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['timeout']} | {r['survived']} | "
                     f"{r['no_tests']} | {r['score']} |")
    lines += ["", f"Survivors ({len(survivors)}):", ""] + [f"- `{s}`" for s in survivors] + [""]
    (out / "mutation_score.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "mutation_score.json").write_text(json.dumps({"rows": rows, "survivors": survivors,
                                                         "minutes": round(seconds / 60, 1)}, indent=1))


def main(argv=None):
    args = parse_args(argv)
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("error: mutmut is not installed; pip install mutmut==3.8.1")
    work = args.work or Path(tempfile.mkdtemp(prefix="mutation_"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    tests = prepare(work, args.modules, args.tests)
    start = time.time()
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(work / "mutmut_run.log", "w", encoding="utf-8") as log:  # mutmut's spinner: a log, not the terminal
        proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:  # progress: mutmut's own counter, once a minute
            time.sleep(60)
            tail = (work / "mutmut_run.log").read_text(encoding="utf-8", errors="replace").split("\r")[-1].strip()
            print(f"[mutation_score {(time.time() - start) / 60:.0f} min] {tail[-100:]}", flush=True)
    seconds = time.time() - start
    status = collect(work)
    rows = summarize(status, args.modules)
    survivors = sorted(n for n, s in status.items() if s == "survived")
    write_report(rows, survivors, seconds, args.out, tests)
    for r in rows:
        print(f"{r['module']:>10}: {r['mutants']:4d} mutants, killed {r['killed']}, timeout {r['timeout']}, "
              f"survived {r['survived']}, no tests {r['no_tests']}  -> score {r['score']} %")
    print(f"{len(survivors)} survivors; report: {args.out / 'mutation_score.md'} ({seconds / 60:.1f} min)")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
