"""The several-people base: a trained one-person pocket base continued on several people.

Issue 23's curriculum, stage 3b of a pocket build whose profile sets `several_steps`, or on
its own on a finished pocket folder (`continue_base`, below). A base that learns several
people from its first step does not learn to read the photo (docs/several-people.md: hair
style from the photo 0.38 after 3,500 steps), so this part starts from a base that already
reads it and copies stated values (the `full` profile's, e.g. the committed one, or the
`several` profile's own tagged one-person base) and continues it:

1. the vocabulary grows by the words of the new questions ("both", "who", ...), every known
   word keeping its id (`lvlm.grow_vocabulary`);
2. the LM, projector and vision tower train further on the one-person curriculum's rows
   (recognition, questions about a named person, captions, portraits, text) with the
   several-people rows mixed in (`SEVERAL_STAGE`): name tags on, recognition among 1-3 other
   described people, "Which of ... / Who of ...", "Are <a> and <b> both ...?", "Is <a> to the
   left of <b>?", "Describe this photo." naming the described people there, and dense text
   rows about several described people; no warm-ups (the base is past them);
3. the one-person skills (`lvlm.measure`, `lvlm.measure_comparisons` with the one-person
   base's own settings, as its card measured them) and the several-people questions
   (`several_people.measure_several_people`) are measured on held-out people.

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
from .pocket import CARD_FILE, SEVERAL_PEOPLE, _jsonable, _key_values, _mean, profile, publish_folder

# The continuation's settings, on top of the `full` profile's base settings: the several-people
# rows, both-here / left-of rows (`lvlm.pair_row`) and named captions (`lvlm.named_caption_row`),
# no warm-ups and no vision probe (the tower is trained; a fresh probe head would only push
# noise into it), a shorter run at half the first lr.
SEVERAL_STAGE = dict(SEVERAL_PEOPLE, pair_share=0.15, named_caption_share=0.15, copy_steps=0, vision_steps=0,
                     vision_aux_weight=0.0, position_aux_weight=0.0, steps=1200, warmup_steps=50, lr=1e-3,
                     log_every=50)


def several_stage_config(base: LvlmTrainConfig, steps: int | None = None, seed: int = 0, **changes: Any
                         ) -> LvlmTrainConfig:
    """The continuation's settings: `base` (the one-person base's own) with `SEVERAL_STAGE` (and
    `steps`, `changes`) on top."""
    settings = dict(SEVERAL_STAGE, **changes)
    if steps is not None:
        settings["steps"] = steps
    return dataclasses.replace(base, **settings, seed=seed)


def train_several_stage(backbone_dir: Path, config: LvlmTrainConfig, run: Path, *, one_person: LvlmTrainConfig,
                        resume: bool, logger, say: Callable[[str], None], measure_scenes: int = 60,
                        check_every: int = 0):
    """Load the base in `backbone_dir`, grow its vocabulary, train it with `config`
    (checkpoints in `run`; `resume` continues one), measure it on held-out people; return
    (the new backbone, the card's record of it). The one-person skills are measured with
    `one_person`, the settings the base was trained with (with `config`, half the recognition
    rows would describe other people too: a harder test than the base's card measured). With
    `check_every`, its one-person comparisons (copying, reading the photo) are measured on 20
    photos every that many steps too, into the log: whether it keeps what the base could do."""
    from ..families import load_backbone
    from ..families.llava15 import Llava15Backbone
    from ..train.common import find_checkpoint
    from .lvlm import collect_vocabulary, grow_vocabulary, measure, measure_comparisons, train_lvlm
    from .several_people import measure_several_people

    backbone = load_backbone(str(backbone_dir), device="cpu", dtype="float32")
    model, image_processor = backbone.model, backbone.image_processor
    words = collect_vocabulary(seed=config.seed, description=config.description, several_people=True)
    tokenizer = grow_vocabulary(model, backbone.tokenizer, words)
    say(f"[several] vocabulary {len(backbone.tokenizer)} -> {len(tokenizer)} words")

    def check(step: int) -> None:
        if check_every and (step + 1) % check_every == 0 and step + 1 < config.steps:
            report = measure_comparisons(model, tokenizer, image_processor, scenes=20, config=one_person)
            report = {key: value for key, value in report.items() if key not in ("examples", "rows")}
            logger.log({"stage": "several-comparisons", "step": step + 1, **report})
            say(f"[several] step {step + 1}: " + json.dumps(report))

    result = train_lvlm(model, tokenizer, image_processor, config, logger=logger,
                        echo=lambda m: say(f"[several] {m}"), checkpoint_dir=run,
                        resume=resume and find_checkpoint(run) is not None, after_step=check)
    say("[several] measuring on held-out people")
    record = {
        "steps": result.steps, "seconds": round(result.seconds, 1), "seconds_before": result.seconds_before,
        "loss_first10": _mean(result.losses[:10]), "loss_last10": _mean(result.losses[-10:]),
        "vocabulary_size": len(tokenizer),
        "heldout_accuracy": measure(model, tokenizer, image_processor, scenes=measure_scenes, config=one_person),
        "heldout_comparisons": measure_comparisons(model, tokenizer, image_processor, scenes=measure_scenes,
                                                   config=one_person),
        "heldout_several_people": measure_several_people(model, tokenizer, image_processor, config,
                                                         scenes=measure_scenes)}
    return Llava15Backbone(model, tokenizer, image_processor, name="plvmctl-pocket"), record


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
