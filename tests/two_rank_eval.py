"""The fake evaluation of test_evaluate.py, run by whatever launched this process (torchrun
in test_scaling_out.py): each rank records the items it asked in ASKED/asked-RANK.txt.

    python two_rank_eval.py TESTSET OUT ASKED [--die]

--die: rank 1 exits abruptly (os._exit) when it starts its second task, as a killed rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from test_evaluate import FakeApi, FakeRuntime

from plvmctl.evaluate import run as run_module

METHODS = ["plvm", "llava-text"]


def record_asked(folder: Path, rank: int, die: bool) -> None:
    """Wrap the item loop: append `method<TAB>key<TAB>mode` of every item it asked."""
    real = run_module._answer_items
    calls = []

    def answer(prepared, engine_api, items, mode, log, *args):
        if die and rank == 1 and calls:
            os._exit(9)
        calls.append(mode)
        asked = real(prepared, engine_api, items, mode, log, *args)
        with open(folder / f"asked-{rank}.txt", "a", encoding="utf-8") as handle:
            handle.writelines(f"{prepared.name}\t{item.key}\t{mode}\n" for item in items)
        return asked

    run_module._answer_items = answer


def main() -> None:
    testset, out, asked = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    asked.mkdir(parents=True, exist_ok=True)
    record_asked(asked, int(os.environ.get("RANK", "0")), "--die" in sys.argv)
    run_module.run_evaluation(FakeRuntime(), testset, METHODS, out, progress=False, engine_api=FakeApi())


if __name__ == "__main__":
    main()
