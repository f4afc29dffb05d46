"""The pocket pipeline end to end, reduced (`--smoke`): every stage runs and learns.

About two to three minutes on a CPU (one thread), hence `slow` (`make test-slow`). The
smoke profile is too short for the PLVM part to learn anything (its Aligner stays at chance);
it shows the base model, the encoder and every loss moving the right way.
"""

from __future__ import annotations

import json

import pytest

from plvmctl.lab.pocket import CARD_FILE, MAX_BYTES, build_pocket, folder_bytes, retrain_aligner


@pytest.mark.slow
def test_smoke_pipeline_learns(tmp_path):
    out = tmp_path / "pocket"
    card = build_pocket(out, "smoke", seed=0, work_dir=tmp_path / "work", echo=None)

    # the folder the pocket recipe expects, complete and small
    for part in ("backbone/config.json", "backbone/model.safetensors", "backbone/tokenizer.json",
                 "encoder/config.json", "encoder/model.safetensors",
                 "encoder/preprocessor_config.json", "aligner/config.json",
                 "aligner/model.safetensors", CARD_FILE):
        assert (out / part).is_file(), part
    assert folder_bytes(out) <= MAX_BYTES
    assert json.loads((out / CARD_FILE).read_text())["profile"] == "smoke"

    # every stage's loss falls
    lvlm, encoder, aligner = card["lvlm"], card["encoder"], card["aligner"]
    assert lvlm["loss_last10"] < 0.5 * lvlm["loss_first10"]
    assert encoder["loss_last10"] < encoder["loss_first10"]
    assert aligner["loss_last10"] < aligner["loss_first10"]
    # the Aligner: one photo per concept, then concepts of several photos from where it stopped
    assert aligner["one_photo"]["steps"] == 30 and aligner["steps"] == 30 + 10
    assert card["settings"]["aligner_references"] == 3 and card["settings"]["aligner_max_references"] == 2

    # the reference encoder identifies held-out people far above chance, and better than
    # the same network untrained (whose colour statistics alone already help)
    retrieval, untrained = encoder["heldout_retrieval"], encoder["heldout_retrieval_before"]
    assert retrieval["top1"] > 10 * retrieval["chance"]
    assert retrieval["top1"] > untrained["top1"] + 0.1

    # the base model answers generic questions about fresh photos of held-out people better
    # than a blind guess among the possible answers, and better than before training
    after, before = lvlm["heldout_accuracy"], lvlm["heldout_accuracy_before"]
    assert after["scene"]["accuracy"] > after["scene"]["chance"] + 0.03, after
    assert after["all"]["accuracy"] > after["all"]["chance"], after
    assert after["all"]["accuracy"] > before["all"]["accuracy"], (before, after)

    # the curriculum's second part continued the base on several people: the words of their
    # questions were added after every word the first part knew, and it was measured on them
    from plvmctl.lab.lvlm import collect_vocabulary

    vocab = json.loads((out / "backbone" / "tokenizer.json").read_text())["model"]["vocab"]
    first_part = collect_vocabulary(seed=0, description=card["settings"]["lvlm"]["description"])
    assert vocab["both"] > max(vocab[word] for word in first_part)
    several = card["lvlm_several"]
    assert several["steps"] == 4 and several["vocabulary_size"] == card["vocabulary_size"] == len(vocab)
    assert {"which", "two-pos", "two-neg"} <= set(several["heldout_several_people"])
    assert card["timings_seconds"]["several"] > 0

    # the warm-ups did their part: induction (copy loss) and seeing (vision probe loss)
    assert lvlm["copy_loss_last10"] < lvlm["copy_loss_first10"]
    assert lvlm["vision_probe_loss_last10"] < lvlm["vision_probe_loss_first10"]

    # the same --work with --resume reuses every finished stage instead of training again
    again = build_pocket(tmp_path / "again", "smoke", seed=0, work_dir=tmp_path / "work", resume=True,
                         echo=None)
    assert again["lvlm"] == card["lvlm"] and again["encoder"] == card["encoder"]
    assert again["timings_seconds"]["lvlm"] == card["timings_seconds"]["lvlm"]
    from plvmctl.errors import PlvmError

    with pytest.raises(PlvmError, match="already holds a build"):
        build_pocket(tmp_path / "other", "smoke", seed=0, work_dir=tmp_path / "work", echo=None)

    # --aligner-only trains a new Aligner on the folder's own base LVLM and encoder, which it
    # keeps byte for byte, and rewrites the card's Aligner part
    kept = {part: (out / part / "model.safetensors").read_bytes() for part in ("backbone", "encoder")}
    # (with one Aligner setting changed, as `--aligner description_weight=1` does: the card says so)
    again = retrain_aligner(out, "smoke", seed=1, echo=None, aligner_overrides={"description_weight": 1})
    for part, content in kept.items():
        assert (out / part / "model.safetensors").read_bytes() == content, part
    assert again["lvlm"] == card["lvlm"] and again["aligner"]["steps"] == card["aligner"]["steps"]
    assert again["settings"]["aligner_description_weight"] == 1.0
    assert isinstance(again["settings"]["aligner_description_weight"], float)
    assert "retrained" in again["aligner"]
    assert json.loads((out / CARD_FILE).read_text())["aligner"] == again["aligner"]
    with pytest.raises(PlvmError, match="not a pocket model folder"):
        retrain_aligner(tmp_path / "work", "smoke", echo=None)

    # `lab.several_base` continues a finished folder's base the same way: every known word at
    # its id, the source folder untouched, the card records the continuation, no Aligner
    from plvmctl.lab.several_base import continue_base

    source_bytes = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    several = continue_base(out, tmp_path / "several", work_dir=tmp_path / "several-work", steps=2,
                            measure_scenes=3, echo=None)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == source_bytes
    old_vocab = json.loads((out / "backbone" / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = json.loads((tmp_path / "several" / "backbone" / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(new_vocab[word] == index for word, index in old_vocab.items())
    assert several["lvlm_several"]["steps"] == 2 and "aligner" not in several
    assert several["lvlm_several"]["settings"]["name_tags"] is True and several["settings"]["several_steps"] == 2
    assert set(several["lvlm_several"]["heldout_several_people"]) >= {"which", "two-pos", "two-neg"}
    assert (tmp_path / "several" / "encoder" / "model.safetensors").read_bytes() == kept["encoder"]
    with pytest.raises(PlvmError, match="already holds a run"):
        continue_base(out, tmp_path / "several2", work_dir=tmp_path / "several-work", steps=2, echo=None)
    with pytest.raises(PlvmError, match="must not be --source"):
        continue_base(out, out, work_dir=tmp_path / "w3", steps=2, echo=None)


def test_an_unknown_aligner_setting_is_refused_before_anything_is_trained(tmp_path):
    from plvmctl.errors import PlvmError

    for part in ("backbone", "encoder"):
        (tmp_path / part).mkdir()
    (tmp_path / CARD_FILE).write_text("{}")
    with pytest.raises(PlvmError, match="unknown setting 'nope'.*description_weight"):
        retrain_aligner(tmp_path, "smoke", echo=None, aligner_overrides={"nope": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", CARD_FILE, "encoder"]


def test_unknown_profile_is_a_plvm_error(tmp_path):
    from plvmctl.errors import PlvmError

    with pytest.raises(PlvmError, match="unknown pocket profile"):
        build_pocket(tmp_path / "x", "huge", echo=None)


def test_the_full_profile_is_what_trained_the_committed_model():
    """`make pocket` rebuilds the committed stack: every setting its card records is the full
    profile's, settings added since at their defaults (they change nothing)."""
    import dataclasses

    from plvmctl.lab.lvlm import LvlmTrainConfig
    from plvmctl.lab.pocket import ASSETS, _jsonable, profile

    card = json.loads((ASSETS / CARD_FILE).read_text(encoding="utf-8"))
    full = _jsonable(dataclasses.asdict(profile("full")))
    defaults = _jsonable(dataclasses.asdict(LvlmTrainConfig()))
    for key, value in card["settings"].items():
        if key == "lvlm":
            for field, setting in full["lvlm"].items():
                assert value.get(field, defaults[field]) == setting, field
        else:
            assert full[key] == value, key


def test_the_several_profile_is_the_full_stack_with_its_base_continued_on_several_people_by_place():
    from plvmctl.lab.pocket import profile
    from plvmctl.lab.several_stage import SEVERAL_STAGE, several_stage_config

    full, several = profile("full"), profile("several")
    assert several.lvlm == full.lvlm
    assert several.several_steps > 0 and full.several_steps == 0
    assert several.lvlm.which_share == 0 and several.lvlm.crowd_share == 0  # one person first
    second = several_stage_config(several.lvlm, several.several_steps)
    assert all(getattr(second, key) == value for key, value in SEVERAL_STAGE.items() if key != "steps")
    assert second.name_tags and second.which_answer == "places" and second.pairs_by_place
    assert (several.encoder, several.aligner_steps, several.aligner_also_share) == \
        (full.encoder, full.aligner_steps, full.aligner_also_share)
