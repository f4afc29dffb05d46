"""The pocket model: a whole PLVM stack trained from scratch on the toy world, on a CPU.

`build_pocket(out_dir)` runs every stage and writes a checkpoint folder that the `pocket`
recipe loads:

    1. data       toy training data for the Aligner (training-part identities only):
                  manifest.jsonl with reference portraits, query photos, attribute Q&As,
                  and further reference photos (clean and hard) per identity
    2. tokenizer  a word-level vocabulary of every word the toy world's questions, answers,
                  templates and the pocket chat template use
    3. base LVLM  a pocket LLaVA (CLIP tower + Llama LM) pretrained from scratch on fresh toy
                  photos with generic questions (plvmctl.lab.lvlm), then frozen; with the
                  profile's `several_steps`, then continued on several people at once
                  (plvmctl.lab.several_stage: a grown vocabulary, name tags, questions about
                  several described people)
    4. encoder    a tiny DINOv2 pretrained on training-part portraits with a supervised
                  contrastive loss (plvmctl.lab.encoder), then frozen
    5. Aligner    PLVM's Aligner (paper layout, k = 16) trained with the weighted Yes/No loss
                  (w = 20, p = 0.6) by plvmctl.train.aligner, base and encoder frozen: one
                  reference photo per concept, then more steps at a lower learning rate with
                  concepts of several photos (`train_pocket_aligner`)
    6. write      OUT/backbone (HF LLaVA folder), OUT/encoder (HF Dinov2Model folder),
                  OUT/aligner (Aligner folder), OUT/card.json (settings, timings, measures)

The folder is assembled next to OUT and renamed into place, so OUT is either the old
checkpoint or the new one, never half of each. Every stage prints its wall time.

    python -m plvmctl.lab.pocket --out plvmctl/assets/pocket          # full (<= ~30 min, 2 cores)
    python -m plvmctl.lab.pocket --out /tmp/pocket-smoke --smoke      # reduced (~3 min)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch
import yaml

from ..errors import PlvmError
from ..fileio import check_free_space, replace_folder, write_json_atomic
from ..train.common import rounded_mean
from .encoder import EncoderSizes, EncoderTrainConfig
from .lvlm import DESCRIPTION_KEYS, LvlmSizes, LvlmTrainConfig
from .several_stage import several_stage_config, train_several_stage

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "pocket"
MAX_BYTES = 20 * 1024 * 1024
# PocketProfile fields that only the Aligner's data and training depend on
ALIGNER_PREFIXES = ("aligner_", "num_context", "identities", "photos")
CARD_FILE = "card.json"


@dataclass
class PocketProfile:
    """Everything that decides what `build_pocket` trains."""

    name: str
    identities: int  # training identities in the Aligner's manifest
    photos: int  # query photos per identity
    lvlm_sizes: LvlmSizes = field(default_factory=LvlmSizes)
    lvlm: LvlmTrainConfig = field(default_factory=LvlmTrainConfig)
    encoder_sizes: EncoderSizes = field(default_factory=EncoderSizes)
    encoder: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)
    aligner_steps: int = 600
    aligner_yes_no_weight: float = 20.0  # PLVM's w on the verdict's first token
    aligner_batch: int = 8
    aligner_lr: float = 1e-3
    aligner_val_identities: int = 20
    aligner_references: int = 1  # reference photos per training identity (toy data: clean and hard)
    # then `aligner_several_steps` more steps from the one-photo Aligner, at `aligner_several_lr`,
    # each training concept made of its primary photo or 2..`aligner_max_references` of them
    aligner_several_steps: int = 0
    aligner_several_lr: float = 3e-4
    aligner_max_references: int = 1
    aligner_also_share: float = 0.0  # share of Aligner samples with other concepts beside theirs (train.also_share)
    aligner_mcq_per_trait: int = 0  # multiple-choice attribute rows per identity and trait (toy.mcq_attributes)
    aligner_attribute_weight: float = 1.0  # weight of attribute answers' tokens (train.attribute_weight)
    aligner_visual_mcq_per_photo: int = 0  # visual multiple-choice rows per query photo (toy.visual_mcq)
    aligner_visual_share: float = 0.0  # share of attribute samples asked with a photo (train.visual_share)
    aligner_description_weight: float = 0.0  # pull toward the written description (train.description_weight)
    # then the base continues this many steps on several people at once (`lab.several_stage`)
    several_steps: int = 0
    num_context: int = 16
    aligner_sizes: dict = field(default_factory=lambda: {
        "mlp_hidden": 256, "hidden": 128, "depth": 2, "heads": 4, "ff_mult": 2})
    measure_scenes: int = 60  # fresh held-out photos for the base model's accuracy
    several_people_scenes: int = 60  # fresh held-out photos for its questions about several people (7 a photo)
    check_every: int = 1000  # base-LVLM steps between two looks at its comparisons (the log)
    measure_identities: int = 200  # held-out identities for the encoder's retrieval


# 96 px photos in 32 px patches: 3 x 3 image tokens, one column per place a person can stand
# (left, middle, right), so "the person on the left" is a fixed set of three tokens.
POCKET_SIZES = LvlmSizes(patch_size=32)

# How the base LVLM learns, stage by stage, each with a direct signal (docs/toy-world.md):
# copying (induction heads), seeing (the vision tower on what is drawn where, each patch told
# its column), then the full mix in which recognition answers spell out the comparison, every
# photo also gets a place-by-place caption, people are described "key value", and half the
# rows carry the person's name as a name token it must say back.
CURRICULUM = LvlmTrainConfig(
    description="keyvalue", recognition_answer="compare", name_share=0.5,
    mcq_answer="value_letter", mcq_share=0.7, about_answer="compare",
    vision_steps=500, copy_steps=900, single_person_steps=0, portrait_rows_per_step=4,
    caption_rows=1, position_aux_weight=1.0,
    scene_share=0.25, recognition_share=0.5, about_share=0.25)

PROFILES = ("full", "several", "smoke")


def profile(name: str) -> PocketProfile:
    """`full` (the committed model), `several` (issue 23's curriculum: the full profile's
    one-person base, then `several_steps` continuing it on several people at once with
    answers that reason place by place, `lab.several_stage`) or `smoke` (a few minutes, still
    shows learning, with a few steps of each stage).

    Earlier ways to a several-people base are measured in docs/several-people.md: the
    several-people rows from the first step (3,500 steps at lr 2e-3, or 2,200 at 1e-3: neither
    learned to read the photo), a base with name tags from its first step continued as here
    (worse than the untagged one continued), and the untagged base continued with answers that
    compare each person asked about in turn ("which of" 0.35 on the base, against 0.52 by
    place)."""
    if name in ("full", "several"):
        full = PocketProfile(
            name="full", identities=2000, photos=4, lvlm_sizes=POCKET_SIZES,
            lvlm=dataclasses.replace(CURRICULUM, steps=3500, warmup_steps=60, lr=2e-3, log_every=50),
            encoder=EncoderTrainConfig(steps=1200, identities_per_step=32, lr=2e-3, log_every=50),
            aligner_steps=6000, aligner_batch=8, aligner_references=5, aligner_several_steps=2000,
            aligner_max_references=4, aligner_also_share=0.3, aligner_mcq_per_trait=2,
            aligner_description_weight=3.0)
        if name == "full":
            return full
        return dataclasses.replace(full, name="several", several_steps=1200)
    if name == "smoke":
        return PocketProfile(
            name="smoke", identities=40, photos=3, lvlm_sizes=POCKET_SIZES,
            lvlm=dataclasses.replace(CURRICULUM, steps=300, warmup_steps=20, lr=3e-3, text_rows_per_step=6,
                                     copy_steps=30, vision_steps=30, single_person_steps=100, log_every=50),
            encoder_sizes=EncoderSizes(hidden=48, layers=2),
            encoder=EncoderTrainConfig(steps=120, identities_per_step=16, warmup_steps=10, log_every=20),
            aligner_steps=30, aligner_batch=4, aligner_lr=2e-3, aligner_val_identities=6,
            aligner_references=3, aligner_several_steps=10, aligner_max_references=2, aligner_also_share=0.3,
            aligner_mcq_per_trait=1, several_steps=4,
            num_context=4, aligner_sizes={"mlp_hidden": 64, "hidden": 32, "depth": 1, "heads": 4,
                                          "ff_mult": 2},
            measure_scenes=40, measure_identities=50, check_every=150)
    raise PlvmError(f"unknown pocket profile {name!r} (known: {', '.join(PROFILES)})")


def aligner_data(settings: PocketProfile, folder: Path, seed: int) -> Path:
    """Stage 1: the toy training data the profile's Aligner learns from; its manifest."""
    from .toy import generate_training_data

    return generate_training_data(folder, settings.identities, settings.photos, seed, extra_scenes=0,
                                  progress=False, references=settings.aligner_references,
                                  mcq_per_trait=settings.aligner_mcq_per_trait,
                                  visual_mcq_per_photo=settings.aligner_visual_mcq_per_photo)


def aligner_train_config(settings: PocketProfile, manifest: str | os.PathLike, out: str | os.PathLike,
                         seed: int, *, yes_no_weight: float | None = None, steps: int | None = None):
    """The Aligner stage's TrainConfig (the profile's w, PLVM's p = 0.6 and 1 : 1 recognition :
    attribute).

    `make results` trains its ablation Aligners with this too, changing only the Yes/No
    weight (and k, which comes from the recipe), so the ablations are the pocket recipe's.
    """
    from ..train.aligner import TrainConfig

    steps = settings.aligner_steps if steps is None else steps
    yes_no_weight = settings.aligner_yes_no_weight if yes_no_weight is None else yes_no_weight
    keys = [DESCRIPTION_KEYS[trait] for trait in settings.lvlm.compare_traits]
    return TrainConfig(lr=settings.aligner_lr, batch_size=settings.aligner_batch, steps=steps,
                       warmup_steps=min(20, steps // 5), schedule="cosine", seed=seed,
                       yes_no_weight=yes_no_weight, positive_share=0.6, recognition_share=0.5,
                       recognition_answer=settings.lvlm.recognition_answer, compare_keys=keys,
                       checkpoint_every=0, val_identities=settings.aligner_val_identities,
                       aligner_sizes=dict(settings.aligner_sizes), data=str(manifest), out=str(out),
                       cache_references=False, also_share=settings.aligner_also_share,
                       attribute_weight=settings.aligner_attribute_weight,
                       visual_share=settings.aligner_visual_share,
                       description_weight=settings.aligner_description_weight)


def several_photos_config(settings: PocketProfile, manifest: str | os.PathLike, out: str | os.PathLike, seed: int):
    """The second Aligner stage's TrainConfig: the first stage's, continued from its Aligner for
    `aligner_several_steps` steps at `aligner_several_lr` with concepts of several photos."""
    return dataclasses.replace(aligner_train_config(settings, manifest, out, seed, steps=settings.aligner_several_steps),
                               lr=settings.aligner_several_lr, max_references=settings.aligner_max_references)


def train_pocket_aligner(settings: PocketProfile, manifest: Path, work: Path, backbone_dir: Path, encoder_dir: Path,
                         seed: int, *, resume: bool, say: Callable[[str], None]):
    """Stage 5: the Aligner, trained in `work/aligner-run` with one reference photo per concept,
    then, when the profile has `aligner_several_steps`, continued in `work/aligner-several-run`
    with concepts of several photos (the toy data's clean and hard references). Each part
    resumes from its checkpoint. Returns (the last part's TrainResult, the parts' results)."""
    from ..runtime import load_runtime
    from ..train.aligner import train_aligner
    from ..train.common import find_checkpoint

    parts = []
    first_run = work / "aligner-run"
    runtime = load_runtime(_stage_recipe(backbone_dir, encoder_dir, None, settings.num_context), device="cpu")
    parts.append(train_aligner(runtime, aligner_train_config(settings, manifest, first_run, seed),
                               echo=lambda m: say(f"[pocket] {m}"),
                               resume=resume and find_checkpoint(first_run) is not None))
    if settings.aligner_several_steps:
        say(f"[pocket] one-photo Aligner validation {parts[0].validation}; now with several photos")
        several_run = work / "aligner-several-run"
        runtime = load_runtime(_stage_recipe(backbone_dir, encoder_dir, parts[0].aligner_path, settings.num_context),
                               device="cpu")
        parts.append(train_aligner(runtime, several_photos_config(settings, manifest, several_run, seed),
                                   echo=lambda m: say(f"[pocket] {m}"),
                                   resume=resume and find_checkpoint(several_run) is not None))
    return parts[-1], parts


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _make_readable(folder: Path) -> None:
    """Temporary folders and files are created private (0700/0600); a checkpoint is for
    everyone to read: folders 0755, files 0644."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _stage_recipe(backbone_dir: Path, encoder_dir: Path, aligner_dir: Path | None, num_context: int):
    from ..recipe import recipe_from_dict

    data: dict[str, Any] = {
        "model": {"source": str(backbone_dir.resolve()), "template": "pocket", "dtype": "float32"},
        "encoder": {"source": str(encoder_dir.resolve())},
        "aligner": {"layout": "paper", "num_context": num_context},
        "generation": {"max_new_tokens": 64},
    }
    if aligner_dir is not None:
        data["aligner"]["path"] = str(aligner_dir.resolve())
    return recipe_from_dict(data, name="pocket-build")


COMMITTED_POCKET = Path(__file__).resolve().parents[1] / "assets" / "pocket"
WORK_FACTOR = 6  # checkpoints: weights + AdamW's two moments, the previous one kept while replaced


def check_pocket_space(out: Path, work: Path) -> None:
    """PlvmError before an hour of training when the disks clearly cannot hold the build: the
    committed pocket's size (about what a build writes) twice beside --out (the staged copy
    and the folder it replaces), WORK_FACTOR times in the work folder."""
    size = sum(path.stat().st_size for path in COMMITTED_POCKET.rglob("*") if path.is_file())
    check_free_space(out.parent, 2 * size, "the pocket checkpoint")
    check_free_space(work, WORK_FACTOR * size, "the pocket build's work folder")


def _stage_record(work: Path, name: str) -> dict[str, Any] | None:
    """What a finished stage of an earlier run in `work` recorded, or None."""
    path = work / f"stage-{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_pocket(out_dir: str | os.PathLike, profile_name: str = "full", seed: int = 0, *,
                 work_dir: str | os.PathLike | None = None, threads: int | None = 1,
                 resume: bool = False, lvlm_overrides: dict[str, Any] | None = None,
                 echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train the whole pocket stack and write the checkpoint folder `out_dir`; return the card.

    `work_dir` keeps the intermediate files (toy data, training logs, checkpoints); by
    default a temporary folder that is removed at the end. With `resume` (which needs
    `work_dir`), finished stages of an earlier run there are reused (each records itself in
    WORK/stage-NAME.json when done) and an interrupted base-LVLM or Aligner stage continues
    from its last checkpoint; their time so far counts in the card. `threads` sets torch's CPU
    threads (None: leave it): one thread is the default because these models are so small
    that a second thread mostly adds synchronisation, and on a shared machine it made every
    step several times slower. `lvlm_overrides` changes fields of the profile's base-LVLM
    settings (`LvlmTrainConfig`) for an experiment; the card records the settings used.
    """
    from ..aligner import load_aligner, save_aligner
    from ..backbone import save_backbone
    from ..families import load_backbone
    from ..families.llava15 import Llava15Backbone
    from ..train.common import JsonlLogger, find_checkpoint
    from .encoder import build_pocket_dinov2, measure_retrieval, train_encoder
    from .lvlm import build_pocket_llava, collect_vocabulary, measure, measure_comparisons, train_lvlm
    from .several_people import measure_several_people

    say = echo or (lambda message: None)
    if resume and work_dir is None:
        raise PlvmError("--resume continues the run kept in --work: give --work")
    if threads is not None:
        if threads < 1:
            raise PlvmError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    settings = profile(profile_name)
    unknown = sorted(set(lvlm_overrides or {}) - {f.name for f in dataclasses.fields(LvlmTrainConfig)})
    if unknown:
        raise PlvmError(f"--lvlm {unknown[0]}: not a base-LVLM setting (see LvlmTrainConfig)")
    settings.lvlm = dataclasses.replace(settings.lvlm, **(lvlm_overrides or {}), seed=seed)
    settings.encoder = dataclasses.replace(settings.encoder, seed=seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlvmError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    check_pocket_space(out, Path(tempfile.gettempdir()) if own_work else Path(work_dir))
    work = Path(tempfile.mkdtemp(prefix="plvmctl-pocket-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    everything = _jsonable(dataclasses.asdict(settings)) | {"seed": seed}
    # What the base-LVLM and encoder stages depend on; the Aligner's data and training (the
    # first and the last stage) are made again when only their own settings changed.
    plan = {key: value for key, value in everything.items() if not key.startswith(ALIGNER_PREFIXES)}
    plan_file = work / "plan.json"
    if resume and plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != plan:
        raise PlvmError(f"cannot resume: {work} holds a build with other settings (profile or seed)")
    if not resume and any(work.glob("stage-*.json")):
        raise PlvmError(f"{work} already holds a build: pass --resume to continue it, or choose another --work")
    write_json_atomic(plan_file, plan)
    aligner_plan = {key: value for key, value in everything.items() if key.startswith(ALIGNER_PREFIXES)}
    aligner_run = work / "aligner-run"
    aligner_plan_file = work / "aligner-plan.json"
    if aligner_run.exists() and (not aligner_plan_file.is_file()
                                 or json.loads(aligner_plan_file.read_text(encoding="utf-8")) != aligner_plan):
        say(f"[pocket] the Aligner settings changed: its data and training are made again")
        shutil.rmtree(aligner_run)
        shutil.rmtree(work / "aligner-several-run", ignore_errors=True)
        (work / "stage-data.json").unlink(missing_ok=True)
    write_json_atomic(aligner_plan_file, aligner_plan)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    timings: dict[str, float] = {}
    card: dict[str, Any] = {"format": "plvmctl.pocket-card", "profile": settings.name, "seed": seed,
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
    started = time.perf_counter()

    def stage(name: str, began: float, before: float = 0.0) -> None:
        timings[name] = round(time.perf_counter() - began + before, 1)
        say(f"[pocket] stage {name}: {timings[name]:.1f} s (total {time.perf_counter() - started:.0f} s)")

    def done(name: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "stage_seconds": timings[name]}
        write_json_atomic(work / f"stage-{name}.json", record)
        return record

    try:
        logger = JsonlLogger(work / "log.jsonl")
        # 1. data -----------------------------------------------------------------------
        began = time.perf_counter()
        manifest = work / "toy" / "manifest.jsonl"
        data = _stage_record(work, "data") if resume else None
        if data is None:
            manifest = aligner_data(settings, work / "toy", seed)
            stage("data", began)
            data = done("data", {})
        timings["data"] = data["stage_seconds"]
        # 2. tokenizer ------------------------------------------------------------------
        began = time.perf_counter()
        vocabulary = collect_vocabulary(seed=seed, description=settings.lvlm.description,
                                        several_people=settings.lvlm.several_people)
        stage("tokenizer", began)
        say(f"[pocket] vocabulary: {len(vocabulary)} words")
        # 3. base LVLM -----------------------------------------------------------------
        began = time.perf_counter()
        backbone_dir = work / "backbone"
        lvlm = _stage_record(work, "lvlm") if resume else None
        if lvlm is None:
            model, tokenizer, image_processor = build_pocket_llava(vocabulary, settings.lvlm_sizes, seed)
            before = measure(model, tokenizer, image_processor, scenes=settings.measure_scenes // 3,
                             config=settings.lvlm)
            run = work / "lvlm-run"
            comparing = settings.lvlm.recognition_answer == "compare"
            several = settings.lvlm.several_people

            def check(step: int) -> None:  # how far the comparison has come, now and then
                if comparing and (step + 1) % settings.check_every == 0 and step + 1 < settings.lvlm.steps:
                    report = measure_comparisons(model, tokenizer, image_processor, scenes=20,
                                                 config=settings.lvlm)
                    logger.log({"stage": "lvlm-comparisons", "step": step + 1, **report})
                    say(f"[pocket] lvlm step {step + 1}: " + json.dumps(
                        {k: v for k, v in report.items() if k not in ("examples", "rows")}))
                    if several:
                        report = measure_several_people(model, tokenizer, image_processor, settings.lvlm,
                                                        scenes=10)
                        logger.log({"stage": "lvlm-several-people", "step": step + 1, **report})
                        say(f"[pocket] lvlm step {step + 1}: " + json.dumps(
                            {k: v for k, v in report.items() if k != "examples"}))

            result = train_lvlm(model, tokenizer, image_processor, settings.lvlm, logger=logger,
                                echo=lambda m: say(f"[pocket] {m}"), checkpoint_dir=run,
                                resume=resume and find_checkpoint(run) is not None, after_step=check)
            after = measure(model, tokenizer, image_processor, scenes=settings.measure_scenes,
                            config=settings.lvlm)
            comparisons = measure_comparisons(model, tokenizer, image_processor,
                                              scenes=settings.measure_scenes, config=settings.lvlm) \
                if comparing else None
            several_people = measure_several_people(model, tokenizer, image_processor, settings.lvlm,
                                                    scenes=settings.several_people_scenes) if several else None
            save_backbone(Llava15Backbone(model, tokenizer, image_processor, name="plvmctl-pocket"), backbone_dir)
            stage("lvlm", began, before=result.seconds_before)  # training time of interrupted runs too
            lvlm = done("lvlm", {
                "steps": result.steps, "seconds": round(result.seconds, 1),
                "loss_first10": rounded_mean(result.losses[:10]),
                "loss_last10": rounded_mean(result.losses[-10:]),
                "copy_loss_first10": rounded_mean(result.copy_losses[:10]),
                "copy_loss_last10": rounded_mean(result.copy_losses[-10:]),
                "vision_probe_loss_first10": rounded_mean(result.vision_losses[:10]),
                "vision_probe_loss_last10": rounded_mean(result.vision_losses[-10:]),
                "heldout_accuracy_before": before, "heldout_accuracy": after,
                "heldout_comparisons": comparisons, "heldout_several_people": several_people})
            say("[pocket] base LVLM held-out accuracy: " + ", ".join(
                f"{k} {v['accuracy']:.2f} (chance {v['chance']:.2f})" for k, v in after.items()))
        timings["lvlm"] = lvlm["stage_seconds"]
        # 3b. several people (the curriculum's second part) ----------------------------------
        several = None
        if settings.several_steps:
            began = time.perf_counter()
            several_dir = work / "backbone-several"
            several = _stage_record(work, "several") if resume else None
            if several is None:
                config = several_stage_config(settings.lvlm, settings.several_steps, seed)
                grown, record = train_several_stage(backbone_dir, config, work / "lvlm-several-run",
                                                    one_person=settings.lvlm, resume=resume, logger=logger,
                                                    say=say, measure_scenes=settings.measure_scenes)
                save_backbone(grown, several_dir)
                stage("several", began, before=record.pop("seconds_before"))
                several = done("several", record)
            timings["several"] = several["stage_seconds"]
            backbone_dir = several_dir
        backbone = load_backbone(str(backbone_dir), device="cpu", dtype="float32")
        vocabulary_size = len(backbone.tokenizer)
        backbone_parameters = sum(p.numel() for p in backbone.model.parameters())
        # 4. encoder -------------------------------------------------------------------
        began = time.perf_counter()
        encoder_dir = work / "encoder"
        encoder = _stage_record(work, "encoder") if resume else None
        if encoder is None:
            encoder_model, encoder_processor = build_pocket_dinov2(settings.encoder_sizes, seed)
            retrieval_before = measure_retrieval(encoder_model, encoder_processor,
                                                 identities=settings.measure_identities)
            trained = train_encoder(encoder_model, encoder_processor, settings.encoder, logger=logger,
                                    echo=lambda m: say(f"[pocket] {m}"))
            retrieval = measure_retrieval(encoder_model, encoder_processor,
                                          identities=settings.measure_identities)
            encoder_model.save_pretrained(encoder_dir, safe_serialization=True)
            encoder_processor.save_pretrained(encoder_dir)
            stage("encoder", began)
            encoder = done("encoder", {
                "steps": trained.steps, "seconds": round(trained.seconds, 1),
                "loss_first10": rounded_mean(trained.losses[:10]),
                "loss_last10": rounded_mean(trained.losses[-10:]),
                "heldout_retrieval_before": retrieval_before, "heldout_retrieval": retrieval,
                "parameters": sum(p.numel() for p in encoder_model.parameters())})
            say(f"[pocket] encoder held-out retrieval top-1: {retrieval['top1']:.3f} "
                f"(untrained {retrieval_before['top1']:.3f}, chance {retrieval['chance']:.3f})")
        timings["encoder"] = encoder["stage_seconds"]
        # 5. Aligner -------------------------------------------------------------------
        began = time.perf_counter()
        result, parts = train_pocket_aligner(settings, manifest, work, backbone_dir, encoder_dir, seed,
                                             resume=resume, say=say)
        stage("aligner", began)
        say(f"[pocket] Aligner validation {result.validation}")
        # 6. write ---------------------------------------------------------------------
        began = time.perf_counter()
        shutil.copytree(backbone_dir, staging / "backbone")
        shutil.copytree(encoder_dir, staging / "encoder")
        aligner = load_aligner(result.aligner_path)
        aligner.config = dataclasses.replace(aligner.config, encoder="plvmctl/assets/pocket/encoder",
                                             base_model="plvmctl/assets/pocket/backbone")
        save_aligner(aligner, staging / "aligner")
        lvlm_card = {key: value for key, value in lvlm.items() if key != "stage_seconds"}
        encoder_card = {key: encoder[key] for key in ("steps", "seconds", "loss_first10", "loss_last10",
                                                        "heldout_retrieval_before", "heldout_retrieval")}
        card.update({
            "what": "pocket PLVM stack for the toy world: base LLaVA, reference DINOv2 and Aligner "
                    "trained from scratch by `python -m plvmctl.lab.pocket`",
            "settings": _jsonable(dataclasses.asdict(settings)),
            "vocabulary_size": vocabulary_size,
            "parameters": {
                "backbone": backbone_parameters,
                "encoder": encoder["parameters"],
                "aligner": sum(p.numel() for p in aligner.parameters()),
            },
            "lvlm": lvlm_card,
            **({"lvlm_several": {key: value for key, value in several.items() if key != "stage_seconds"}}
               if several else {}),
            "encoder": encoder_card,
            "aligner": _aligner_card(settings, result, parts),
            "timings_seconds": timings,
        })
        write_json_atomic(staging / CARD_FILE, card)
        size = folder_bytes(staging)
        if size > MAX_BYTES:
            raise PlvmError(f"the pocket checkpoint is {size / 1e6:.1f} MB, over the 20 MB limit")
        _make_readable(staging)
        replace_folder(staging, out)
        stage("write", began)
        card["timings_seconds"] = timings
        card["bytes"] = folder_bytes(out)
        card["total_seconds"] = round(sum(timings.values()), 1)
        write_json_atomic(out / CARD_FILE, card)
        (out / CARD_FILE).chmod(0o644)
        say(f"[pocket] wrote {out} ({card['bytes'] / 1e6:.2f} MB) in {card['total_seconds']:.0f} s")
        logger.close()
        return card
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _aligner_card(settings: PocketProfile, result, parts: list | None = None) -> dict[str, Any]:
    """The card's `aligner` section: what stage 5 trained and how it validated (the one-photo
    part's validation too when a part with several photos followed it)."""
    parts = parts or [result]
    first = sum(parts[0].losses[:10]) / max(1, len(parts[0].losses[:10]))
    last = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
    runs = [json.loads((part.out / "run.json").read_text(encoding="utf-8")) for part in parts]
    seconds = [run.get("seconds") for run in runs]
    card = {"steps": sum(part.steps for part in parts), "loss_first10": first, "loss_last10": last,
            "final_loss": runs[-1].get("final_loss"),
            "training_seconds": round(sum(seconds), 3) if None not in seconds else None,
            "validation_recognition": result.validation,
            "validation_note": "recognition on manifest identities held out of Aligner "
                               "training (training part of the world): "
                               + ("generated answers, verdict read as by `plvmctl eval`"
                                  if settings.lvlm.recognition_answer == "compare"
                                  else "Yes/No first-token logits")}
    if len(parts) > 1:
        card["one_photo"] = {"steps": parts[0].steps, "validation_recognition": parts[0].validation,
                             "training_seconds": seconds[0]}
    return card


def retrain_aligner(out_dir: str | os.PathLike, profile_name: str = "full", seed: int = 0, *,
                    work_dir: str | os.PathLike | None = None, threads: int | None = 1,
                    resume: bool = False, aligner_overrides: dict[str, Any] | None = None,
                    echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Stages 1 and 5 again on a finished pocket folder: new toy data, a new Aligner trained
    on its frozen base LVLM and encoder with the profile's Aligner settings (`aligner_overrides`:
    some of them changed, keys without the `aligner_` prefix); the folder's aligner/ and the
    card's Aligner parts are replaced (atomically, as a whole folder), the base LVLM and the
    encoder are kept byte for byte.

    For when only the Aligner's settings change: the base LVLM is most of `make pocket`'s hour.
    """
    from ..aligner import load_aligner, save_aligner

    say = echo or (lambda message: None)
    if resume and work_dir is None:
        raise PlvmError("--resume continues the run kept in --work: give --work")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    card_file = out / CARD_FILE
    if not card_file.is_file() or not (out / "backbone").is_dir() or not (out / "encoder").is_dir():
        raise PlvmError(f"{out} is not a pocket model folder (card.json, backbone/, encoder/)")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    settings = profile(profile_name)
    if aligner_overrides:
        known = {field.name for field in dataclasses.fields(PocketProfile) if field.name.startswith("aligner_")}
        changed = {f"aligner_{key}": value for key, value in aligner_overrides.items()}
        unknown = sorted(set(changed) - known)
        if unknown:
            raise PlvmError(f"--aligner: unknown setting {unknown[0][len('aligner_'):]!r} (known: "
                            f"{', '.join(sorted(name[len('aligner_'):] for name in known))})")
        for key, value in changed.items():  # "1" read as YAML is an int: a float setting stays a float
            if isinstance(getattr(settings, key), float) and isinstance(value, int):
                changed[key] = float(value)
        settings = dataclasses.replace(settings, **changed)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="plvmctl-aligner-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    aligner_plan = {key: value for key, value in _jsonable(dataclasses.asdict(settings)).items()
                    if key.startswith(ALIGNER_PREFIXES)} | {"seed": seed}
    plan_file = work / "aligner-plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != aligner_plan:
        say(f"[pocket] {work} holds an Aligner run with other settings: made again")
        for kept in ("toy", "aligner-run", "aligner-several-run"):
            shutil.rmtree(work / kept, ignore_errors=True)
    write_json_atomic(plan_file, aligner_plan)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    timings = dict(card.get("timings_seconds", {}))
    try:
        began = time.perf_counter()
        manifest = work / "toy" / "manifest.jsonl"
        if not (resume and manifest.is_file()):  # (a resumed run keeps the card's data time)
            manifest = aligner_data(settings, work / "toy", seed)
            timings["data"] = round(time.perf_counter() - began, 1)
        began = time.perf_counter()
        result, parts = train_pocket_aligner(settings, manifest, work, out / "backbone", out / "encoder", seed,
                                             resume=resume, say=say)
        aligner_card = _aligner_card(settings, result, parts)
        # a resumed training counts its earlier part too (the run's own clock)
        timings["aligner"] = round(max(time.perf_counter() - began, aligner_card["training_seconds"] or 0.0), 1)
        say(f"[pocket] Aligner validation {result.validation} in {timings['aligner']:.0f} s")
        for part in ("backbone", "encoder"):
            shutil.copytree(out / part, staging / part)
        aligner = load_aligner(result.aligner_path)
        aligner.config = dataclasses.replace(aligner.config, encoder="plvmctl/assets/pocket/encoder",
                                             base_model="plvmctl/assets/pocket/backbone")
        save_aligner(aligner, staging / "aligner")
        trained = _jsonable(dataclasses.asdict(settings))
        card["settings"] = {**card.get("settings", {}),
                            **{key: value for key, value in trained.items() if key.startswith(ALIGNER_PREFIXES)}}
        card["parameters"] = {**card.get("parameters", {}),
                              "aligner": sum(p.numel() for p in aligner.parameters())}
        card["aligner"] = aligner_card
        card["aligner"]["retrained"] = ("stages data and Aligner made again on this folder's base "
                                        "LVLM and encoder by `python -m plvmctl.lab.pocket --aligner-only`")
        card["timings_seconds"] = timings
        card["total_seconds"] = round(sum(timings.values()), 1)
        publish_folder(staging, out, card)
        say(f"[pocket] wrote {out} (Aligner {timings['aligner']:.0f} s)")
        return card
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def publish_folder(staging: Path, out: Path, card: dict[str, Any]) -> None:
    """Write `card` into the assembled folder `staging` (with its size in bytes), make the
    folder readable and put it in place of `out` in one rename."""
    write_json_atomic(staging / CARD_FILE, card)
    _make_readable(staging)
    card["bytes"] = folder_bytes(staging)
    write_json_atomic(staging / CARD_FILE, card)
    (staging / CARD_FILE).chmod(0o644)
    replace_folder(staging, out)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _key_values(settings: tuple[str, ...], option: str) -> dict[str, Any]:
    """KEY=VALUE strings -> {KEY: VALUE read as YAML}."""
    values: dict[str, Any] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise click.BadParameter(f"{setting!r} is not KEY=VALUE", param_hint=option)
        values[key.strip()] = yaml.safe_load(value)
    return values


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder to write (replaced atomically).")
@click.option("--smoke", is_flag=True, help="The reduced profile: a few minutes, still shows learning.")
@click.option("--profile", "profile_name", default=None, type=click.Choice(PROFILES),
              help="Which profile to train [default: full, or smoke with --smoke]; `several`: a base that "
                   "learns several people at once (docs/several-people.md).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--work", "work_dir", default=None, type=click.Path(file_okay=False),
              help="Keep intermediate files (toy data, logs) here [default: a temporary folder].")
@click.option("--threads", default=1, show_default=True, type=int, help="torch CPU threads.")
@click.option("--lvlm", "lvlm_settings", multiple=True, metavar="KEY=VALUE",
              help="Change one base-LVLM setting of the profile (LvlmTrainConfig), for experiments; "
                   "repeatable. The card records the settings used.")
@click.option("--resume", is_flag=True,
              help="Continue the build kept in --work: finished stages are reused, an interrupted "
                   "one continues from its last checkpoint.")
@click.option("--aligner-only", is_flag=True,
              help="Keep --out's base LVLM and encoder; make the Aligner's data and train the "
                   "Aligner again with the profile's settings (minutes, not the hour of a build).")
@click.option("--aligner", "aligner_settings", multiple=True, metavar="KEY=VALUE",
              help="With --aligner-only: change one Aligner setting of the profile (the profile's "
                   "`aligner_KEY`, e.g. attribute_weight=8), for experiments; repeatable. The card "
                   "records the settings used.")
def main(out_dir: str, smoke: bool, profile_name: str | None, seed: int, work_dir: str | None, threads: int,
         resume: bool, lvlm_settings: tuple[str, ...], aligner_only: bool,
         aligner_settings: tuple[str, ...]) -> None:
    """Train the pocket PLVM stack from scratch and write it to --out."""
    overrides = _key_values(lvlm_settings, "--lvlm")
    aligner_overrides = _key_values(aligner_settings, "--aligner")
    if aligner_overrides and not aligner_only:
        raise click.BadParameter("Aligner settings are changed with --aligner-only", param_hint="--aligner")
    if smoke and profile_name not in (None, "smoke"):
        raise click.BadParameter(f"--smoke is the smoke profile, not {profile_name!r}", param_hint="--profile")
    name = profile_name or ("smoke" if smoke else "full")
    try:
        if aligner_only:
            if overrides:
                raise PlvmError("--lvlm changes the base LVLM, which --aligner-only keeps")
            retrain_aligner(out_dir, name, seed, work_dir=work_dir, threads=threads, resume=resume,
                            aligner_overrides=aligner_overrides,
                            echo=lambda message: click.echo(message, err=True))
            return
        build_pocket(out_dir, name, seed, work_dir=work_dir, threads=threads,
                     resume=resume, lvlm_overrides=overrides,
                     echo=lambda message: click.echo(message, err=True))
    except PlvmError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
