"""The several-people base on its own: a finished pocket folder's base continued on several people.

The second part of issue 23's curriculum (`lab.several_stage`), run on a finished pocket
folder instead of as stage 3b of a build. A base that learns several people from its first
step does not learn to read the photo (docs/several-people.md: hair style from the photo 0.38
after 3,500 steps), so the stage starts from a base that already reads it and copies stated
values: the `full` profile's, e.g. the committed one.

The source's Aligner is not carried over (it maps into the old base's embeddings): train one
on the new folder with `python -m plvmctl.lab.pocket --out OUT --aligner-only`. Resumable:
the training keeps a checkpoint in WORK/lvlm-several-run.

    python -m plvmctl.lab.several_base --source plvmctl/assets/pocket --out runs/pocket-several \\
        --work runs/pocket-several-work
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click
import torch

from ..errors import PlvmError
from ..fileio import write_json_atomic
from .lvlm import LvlmTrainConfig
from .pocket import CARD_FILE, _jsonable, _key_values, profile, publish_folder
from .several_stage import SEVERAL_STAGE, several_stage_config, train_several_stage


def continue_base(source: str | os.PathLike, out_dir: str | os.PathLike, *, work_dir: str | os.PathLike,
                  steps: int | None = None, seed: int = 0, resume: bool = False, threads: int | None = 1,
                  measure_scenes: int = 60, check_every: int = 0, changes: dict[str, Any] | None = None,
                  echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Continue `source`'s base LVLM on several people and write the pocket folder `out_dir`
    (its backbone, the source's encoder, a card); return the card. `work_dir` keeps the
    checkpoint and the log; `resume` continues an interrupted run there. `changes`: settings
    of the continuation (`LvlmTrainConfig` fields) other than `SEVERAL_STAGE`'s, for experiments;
    `check_every`: as `train_several_stage`."""
    from ..backbone import save_backbone
    from ..train.common import JsonlLogger, find_checkpoint

    say = echo or (lambda message: None)
    if threads is not None:
        torch.set_num_threads(threads)
    source, out, work = Path(source), Path(out_dir), Path(work_dir)
    card_file = source / CARD_FILE
    if not card_file.is_file() or not (source / "backbone").is_dir() or not (source / "encoder").is_dir():
        raise PlvmError(f"{source} is not a pocket model folder (card.json, backbone/, encoder/)")
    if out.resolve() == source.resolve():
        raise PlvmError("--out must not be --source: the source stays as it is")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    one_person = dataclasses.replace(profile("full").lvlm, seed=seed)
    config = several_stage_config(one_person, steps, seed, **(changes or {}))
    work.mkdir(parents=True, exist_ok=True)
    plan = {"source_card_bytes": card_file.stat().st_size, "config": _jsonable(dataclasses.asdict(config))}
    plan_file = work / "several-plan.json"
    run = work / "lvlm-several-run"
    if resume and plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != plan:
        raise PlvmError(f"cannot resume: {work} holds a run with other settings or another source")
    if not resume and find_checkpoint(run) is not None:
        raise PlvmError(f"{work} already holds a run: pass --resume to continue it, or choose another --work")
    write_json_atomic(plan_file, plan)
    logger = JsonlLogger(work / "log.jsonl")
    began = time.perf_counter()
    backbone, record = train_several_stage(source / "backbone", config, run, one_person=one_person, resume=resume,
                                           logger=logger, say=say, measure_scenes=measure_scenes,
                                           check_every=check_every)
    logger.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_backbone(backbone, staging / "backbone")
        shutil.copytree(source / "encoder", staging / "encoder")
        card["settings"] = {**card.get("settings", {}), "several_steps": config.steps}
        card["lvlm_several"] = {
            "what": "the base LVLM above continued on several people by `python -m plvmctl.lab.several_base`",
            "settings": _jsonable(dataclasses.asdict(config)),
            **{key: value for key, value in record.items() if key != "seconds_before"}}
        card.pop("aligner", None)  # the source's Aligner fits the old base: train one with --aligner-only
        card["vocabulary_size"] = record["vocabulary_size"]
        card.setdefault("timings_seconds", {})["several"] = round(time.perf_counter() - began
                                                                  + record["seconds_before"], 1)
        publish_folder(staging, out, card)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    several = record["heldout_several_people"]
    say(f"[several] wrote {out}: " + json.dumps({key: several[key] for key in several
                                                if key not in ("examples", "reading")}))
    return card


@click.command()
@click.option("--source", default="plvmctl/assets/pocket", show_default=True, type=click.Path(file_okay=False),
              help="The pocket folder whose base LVLM to continue (a `full`-profile base).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Pocket folder to write: the continued base, the source's encoder, no Aligner yet.")
@click.option("--work", "work_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint and log of the run (what --resume continues).")
@click.option("--steps", default=None, type=int, help=f"Training steps [default: {SEVERAL_STAGE['steps']}].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=1, show_default=True, type=int, help="torch CPU threads.")
@click.option("--measure-scenes", default=60, show_default=True, type=int,
              help="Held-out photos for each measurement at the end.")
@click.option("--check-every", default=0, show_default=True, type=int,
              help="Measure the one-person comparisons (copying, reading) every N steps into the log.")
@click.option("--lvlm", "lvlm_settings", multiple=True, metavar="KEY=VALUE",
              help="Change one setting of the continuation (LvlmTrainConfig), for experiments; repeatable.")
@click.option("--resume", is_flag=True, help="Continue the run kept in --work from its last checkpoint.")
def main(source: str, out_dir: str, work_dir: str, steps: int | None, seed: int, threads: int,
         measure_scenes: int, check_every: int, lvlm_settings: tuple[str, ...], resume: bool) -> None:
    """Continue a pocket base LVLM on several people at once (issue 23's curriculum)."""
    changes = _key_values(lvlm_settings, "--lvlm")
    unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(LvlmTrainConfig)})
    if unknown:
        raise click.BadParameter(f"{unknown[0]}: not a base-LVLM setting (see LvlmTrainConfig)", param_hint="--lvlm")
    try:
        continue_base(source, out_dir, work_dir=work_dir, steps=steps, seed=seed, resume=resume,
                      threads=threads, measure_scenes=measure_scenes, check_every=check_every,
                      changes=changes, echo=lambda message: click.echo(message, err=True))
    except PlvmError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
