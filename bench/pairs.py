"""Benchmark: several concepts in one question and caption name precision, every method, on
held-out toy identities; writes docs/bench/pairs.md (the report `plvmctl eval` wrote, under a
header that says how it was made).

Two `plvmctl` commands, run as a user would run them (each printed on stderr):

    plvmctl toy testset --out OUT/ts --identities N --seed S           (N group photos too)
    plvmctl --recipe pocket eval --testset OUT/ts --method METHODS --pairs --captions \\
        --neg-per-identity 10 --out OUT/eval

`eval --pairs` asks, per query photo, recognition with a second concept's sentence in the
prompt, which of two, which of three and who of four, and per group photo both-here, left-of
and who-of; `--captions` asks "Describe this photo." with the concepts in the photo and one who
is not (recall and name precision). The trained methods (Yo'LLaVA, MyVLM, MC-LLaVA) take their
negatives from the test set's negatives/ folder. The run folder is made afresh each time.

    OMP_NUM_THREADS=1 python bench/pairs.py --out runs/pairs --doc docs/bench/pairs.md
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = "plvm,yollava,mcllava,myvlm,llava-text,llava-none"


def plvmctl(*args: str) -> float:
    """Run one plvmctl command on the CPU; return its seconds."""
    command = [sys.executable, "-m", "plvmctl", *args]
    print("$ plvmctl " + " ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 1)


def commit() -> str:
    """The checkout's commit (short), with "+changes" when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pairs"))
    parser.add_argument("--doc", type=Path, default=None, help="Markdown file to write (default: print it).")
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=METHODS)
    options = parser.parse_args()
    shutil.rmtree(options.out, ignore_errors=True)
    testset, run = options.out / "ts", options.out / "eval"
    made = plvmctl("toy", "testset", "--out", str(testset), "--identities", str(options.identities),
                   "--seed", str(options.seed))
    asked = plvmctl("--recipe", "pocket", "--device", "cpu", "eval", "--testset", str(testset),
                    "--method", options.methods, "--pairs", "--captions", "--neg-per-identity", "10",
                    "--out", str(run))
    report = (run / "results.md").read_text(encoding="utf-8")
    report = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", report, flags=re.MULTILINE)
    report = report.replace(str(Path.cwd().resolve()) + "/", "")
    header = (
        f"# Several concepts in one question: `eval --pairs --captions` on {options.identities} held-out "
        "toy identities\n\n"
        "Generated, not typed: the section below is the `results.md` that `plvmctl eval` wrote, with "
        "its headings moved down one level and the checkout's path taken out. Made on "
        f"{time.strftime('%Y-%m-%d')} at commit {commit()} on the committed pocket model (CPU), by\n\n"
        f"    OMP_NUM_THREADS=1 python bench/pairs.py --out {options.out} --identities {options.identities} "
        f"--seed {options.seed}\n\n"
        f"which ran `plvmctl toy testset` ({made} s) and `plvmctl --recipe pocket eval --method {options.methods} "
        f"--pairs --captions --neg-per-identity 10` ({asked} s; see the module docstring).\n\n---\n\n")
    text = header + report
    if options.doc is None:
        print(text)
    else:
        options.doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
