"""Mutation spot-check of the verdict's code (issue 9, section 5): apply one small change at a
time to a copy of the source tree, run the unit suite against the copy, and report whether the
suite caught it (some test failed) or the mutation survived (every test passed).

The six mutations the issue lists come first; a few more of the same kind follow. Every one
must be caught. Not a dependency of fastmmio: run it by hand.

    .venv/bin/python tools/mutate_verdict.py            # the whole unit suite per mutation
    .venv/bin/python tools/mutate_verdict.py --only 1,5 # some of them
    .venv/bin/python tools/mutate_verdict.py --fast     # the verdict/compare tests only

Exit status 0 when every mutation was caught, 1 when one survived, 2 when a mutation no longer
applies (the line it changes is gone: update this list).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    what: str
    path: str  # relative to the repository
    old: str
    new: str


MUTATIONS = (
    Mutation("the bottom line's 'as fast under every setting' computed with any, not all",
             "src/fastmmio/verdict/judge.py",
             "all(c == AS_FAST for c in classes)", "any(c == AS_FAST for c in classes)"),
    Mutation("a scenario's ratio taken against the bare-metal PIO doorbell instead of the same "
             "scenario's", "src/fastmmio/compare/core.py",
             "return self.cell(PIO_REFERENCE, cell.run.options, cell.scenario)",
             "return self.cell(PIO_REFERENCE, sim_options(cell.run.options.variant), "
             "cell.scenario)"),
    Mutation("the 'as fast' judgement (and so its sentence) using the default tolerance while "
             "the header states another", "src/fastmmio/verdict/judge.py",
             'points = {k: _point(c, pios[k], k[0] == "pio", tolerance)',
             'points = {k: _point(c, pios[k], k[0] == "pio", DEFAULT_TOLERANCE)'),
    Mutation("the as_fast value written to results.json always true",
             "src/fastmmio/verdict/judge.py",
             'd["as_fast"] = self.as_fast', 'd["as_fast"] = True'),
    Mutation("green and yellow swapped in the answer table", "src/fastmmio/report/compare.py",
             'CLASS_STYLE = {AS_FAST: "green", SLOWER: "yellow"',
             'CLASS_STYLE = {AS_FAST: "yellow", SLOWER: "green"'),
    Mutation("the CSV ratio_to_pio column holding cycles", "src/fastmmio/report/compare.py",
             '"ratio_to_pio": _r(ratio, 4)', '"ratio_to_pio": _r(c.cycles, 4)'),
    # more of the same kind
    Mutation("the tolerance rule made strict (< instead of <=)", "src/fastmmio/verdict/judge.py",
             "return r <= limit(tolerance)", "return r < limit(tolerance)"),
    Mutation("a doorbell whose checks fail judged by its ratio", "src/fastmmio/verdict/judge.py",
             "if status not in (OK, NA) and r is not None:", "if False:"),
    Mutation("break-even direction reversed for a statement that holds",
             "src/fastmmio/costs/linear.py",
             'direction = ("below" if ci > 0 else "above") if holds else',
             'direction = ("above" if ci > 0 else "below") if holds else'),
    Mutation("the uncertainty's share counting the slower samples",
             "src/fastmmio/verdict/judge.py",
             "share = np.mean(within(r, tolerance), axis=1)",
             "share = np.mean(~within(r, tolerance), axis=1)"),
    Mutation("the estimate share ignoring depends", "src/fastmmio/verdict/text.py",
             "leaning = {k: d for k, d in items.items() if profile.estimate_roots(k)}",
             "leaning = {k: d for k, d in items.items() "
             "if profile.price_entry(k).basis == 'estimate'}"),
)

FAST_TESTS = ["tests/unit/test_verdict_judge.py", "tests/unit/test_costs_linear.py",
              "tests/unit/test_verdict.py", "tests/unit/test_compare.py"]


def run_suite(tree: Path, fast: bool) -> tuple[bool, str, float]:
    """(caught, first failing test, seconds): the suite against ``tree``'s sources."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(tree), *FAST_TESTS]
    if not fast:
        args.append("tests/unit")
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    failed = next((ln.split(" ", 1)[1] for ln in proc.stdout.splitlines()
                   if ln.startswith("FAILED ") or ln.startswith("ERROR ")), "")
    return proc.returncode != 0, failed, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="mutation numbers, comma-separated (1-based)")
    ap.add_argument("--fast", action="store_true",
                    help="run only the verdict, compare and costs.linear tests")
    args = ap.parse_args(argv)
    chosen = [int(x) for x in args.only.split(",") if x] or range(1, len(MUTATIONS) + 1)
    survived = 0
    with tempfile.TemporaryDirectory(prefix="fastmmio-mut-") as tmp:
        tree = Path(tmp)
        for part in ("src", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tree / part)
        ok, failed, secs = run_suite(tree, args.fast)
        if ok:
            print(f"the unmutated suite fails ({failed}): fix that first", file=sys.stderr)
            return 2
        print(f"unmutated: every test passes ({secs:.0f} s)")
        for i in chosen:
            m = MUTATIONS[i - 1]
            path = tree / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{i}. {m.what}: NO LONGER APPLIES ({m.old!r} not found once in "
                      f"{m.path})", file=sys.stderr)
                return 2
            path.write_text(original.replace(m.old, m.new))
            try:
                caught, failed, secs = run_suite(tree, args.fast)
            finally:
                path.write_text(original)
            survived += not caught
            verdict = f"caught by {failed}" if caught else "SURVIVED"
            print(f"{i}. {m.what}: {verdict} ({secs:.0f} s)", flush=True)
    print(f"{len(list(chosen)) - survived} of {len(list(chosen))} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
