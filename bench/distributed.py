"""Benchmark: the same `plvmctl ask --batch` with one process and with N processes (torchrun,
one torch thread each), on toy photos of the pocket model's world.

Prints one JSON object: photos/s of each (whole command, start-up included, and asking only:
the same launch of a batch file with no question taken off), their ratios, whether the merged
output is byte-identical to one process's, and os.getloadavg() before and after (the machine
is shared: a high load depresses the ratio). Under "eval", the same for `plvmctl eval --method
plvm` on a toy test set: items/s of the whole command, and whether the merged item log and the
scores are one process's.

    python bench/distributed.py --recipe pocket --questions 4800 --eval-identities 40 --eval-queries 8 \
        --json-out docs/bench/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plvmctl.lab import toy

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 96  # distinct toy photos; a longer batch asks about them again


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def timed(command: list[str], cwd: Path) -> float:
    tick = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return seconds


def make_work(folder: Path, recipe: str, questions: int, concepts: int) -> tuple[Path, Path]:
    """A store with `concepts` toy identities encoded and a batch file of `questions` photo
    questions about them (a portrait of someone, asked about one of the concepts; PHOTOS
    distinct portraits)."""
    people = toy.training_identities()[:concepts + 4]
    store = folder / "store"
    for i, identity in enumerate(people[:concepts]):
        reference = folder / "refs" / f"c{i}.png"
        reference.parent.mkdir(parents=True, exist_ok=True)
        toy.render_portrait(identity, random.Random(i), size=96).save(reference)
        timed([sys.executable, "-m", "plvmctl", "--recipe", recipe, "--store", str(store), "encode",
               str(reference), "--name", f"c{i}"], folder)
    lines = []
    for q in range(questions):
        photo = folder / "photos" / f"p{q % PHOTOS}.png"
        if not photo.exists():
            photo.parent.mkdir(parents=True, exist_ok=True)
            toy.render_portrait(people[q % len(people)], random.Random(1000 + q), size=96).save(photo)
        lines.append({"image": str(photo), "question": f"Is <c{q % concepts}> in this photo?"})
    batch = folder / "q.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return store, batch


def bench_eval(folder: Path, recipe: str, processes: int, identities: int, queries: int) -> dict:
    """`plvmctl eval --method plvm` on a toy test set with one process and with `processes`:
    items/s of the whole command, their ratio, and whether the merged item log and the scores
    are one process's."""
    testset = toy.write_testset(folder / "set", identities, seed=0, queries_per_identity=queries, progress=False)
    evaluate = ["-m", "plvmctl", "--recipe", recipe, "eval", "--testset", str(testset), "--method", "plvm"]
    one = timed([sys.executable, *evaluate, "--out", str(folder / "one")], folder)
    several = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(processes), *evaluate, "--out", str(folder / "two")], folder)
    results = {run: json.loads((folder / run / "results.json").read_text()) for run in ("one", "two")}
    scores = ("recognition", "text_qa", "visual_qa")
    items = sum(1 for _ in (folder / "one" / "items" / "plvm.jsonl").open())
    return {
        "identities": identities, "queries_per_identity": queries, "items": items,
        "one_process": {"seconds": round(one, 2), "items_per_second": round(items / one, 3)},
        "several_processes": {"seconds": round(several, 2), "items_per_second": round(items / several, 3)},
        "ratio": round(one / several, 3),
        "merged_item_log_identical": (folder / "one" / "items" / "plvm.jsonl").read_bytes()
        == (folder / "two" / "items" / "plvm.jsonl").read_bytes(),
        "scores_identical": all(results["one"]["methods"]["plvm"][key] == results["two"]["methods"]["plvm"][key]
                                for key in scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="pocket")
    parser.add_argument("--questions", type=int, default=960)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--eval-identities", type=int, default=12,
                        help="toy test set identities for the eval run (0: no eval run)")
    parser.add_argument("--eval-queries", type=int, default=6, help="query photos per identity")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        folder = Path(tmp)
        store, batch = make_work(folder, args.recipe, args.questions, args.concepts)
        empty = folder / "empty.jsonl"
        empty.write_text("")
        ask = ["-m", "plvmctl", "--recipe", args.recipe, "--store", str(store), "ask", "--batch-size",
               str(args.batch_size)]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(args.processes)]
        startup = timed([sys.executable, *ask, "--batch", str(empty), "--out", str(folder / "e1.jsonl")], folder)
        one = timed([sys.executable, *ask, "--batch", str(batch), "--out", str(folder / "one.jsonl")], folder)
        startup_several = timed([*launch, *ask, "--batch", str(empty), "--out", str(folder / "e2.jsonl")], folder)
        several = timed([*launch, *ask, "--batch", str(batch), "--out", str(folder / "two.jsonl")], folder)
        identical = (folder / "one.jsonl").read_bytes() == (folder / "two.jsonl").read_bytes()
        answered = sum(json.loads(line)["error"] is None for line in (folder / "one.jsonl").open())
        evaluation = (bench_eval(folder / "eval", args.recipe, args.processes, args.eval_identities,
                                 args.eval_queries) if args.eval_identities else None)
    load_after = os.getloadavg()

    def rate(seconds: float) -> float:
        return round(args.questions / seconds, 3)

    report = {
        "bench": "distributed", "recipe": args.recipe, "questions": args.questions,
        "answered": answered, "concepts": args.concepts, "batch_size": args.batch_size,
        "processes": args.processes, "threads_per_process": 1,
        "startup_seconds": {"one_process": round(startup, 2), "several_processes": round(startup_several, 2)},
        "one_process": {"seconds": round(one, 2), "photos_per_second": rate(one),
                        "asking_photos_per_second": rate(one - startup)},
        "several_processes": {"seconds": round(several, 2), "photos_per_second": rate(several),
                              "asking_photos_per_second": rate(several - startup_several)},
        "ratio": round(one / several, 3),
        "asking_ratio": round((one - startup) / (several - startup_several), 3),
        "merged_output_identical": identical,
        "eval": evaluation,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
