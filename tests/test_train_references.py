"""Training the Aligner with several reference photos per concept (`train.max_references`):
the toy data that has them, the manifest, the sampler's draw, and a training concept equal to
the one `encode a.jpg b.jpg` makes from the same photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plvmctl.lab.toy import generate_training_data
from plvmctl.recipe import load_recipe
from plvmctl.references import encode_photos
from plvmctl.runtime import load_runtime
from plvmctl.train.aligner import ReferenceTokens, TrainConfig, batch_concepts, train_aligner
from plvmctl.train.data import PlvmSampler, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_training_data(tmp_path_factory.mktemp("toy"), 4, 2, seed=3, extra_scenes=0,
                                  progress=False, references=4)


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(load_recipe("tiny"), device="cpu")


def test_further_references_are_written_and_listed_without_changing_the_rest(toy, tmp_path):
    plain = generate_training_data(tmp_path / "plain", 4, 2, seed=3, extra_scenes=0, progress=False)
    rows = [json.loads(line) for line in toy.read_text().splitlines()]
    plain_rows = [json.loads(line) for line in plain.read_text().splitlines()]
    for row, plain_row in zip(rows, plain_rows):
        assert row.pop("references") == [f"images/{row['name']}/ref{j}.png" for j in (2, 3, 4)]
        assert row == plain_row
    for path in sorted(plain.parent.rglob("*.png")):
        assert (toy.parent / path.relative_to(plain.parent)).read_bytes() == path.read_bytes()
    assert len(list(toy.parent.rglob("ref[234].png"))) == 12


def test_the_manifest_reads_further_references_and_reports_missing_ones(toy, tmp_path):
    manifest = read_manifest(toy)
    assert all(len(identity.references) == 3 and all(p.is_file() for p in identity.references)
               for identity in manifest.identities)
    first = manifest.identities[0]
    first.references[0].unlink()
    again = read_manifest(toy)
    assert len(again.identities[0].references) == 2
    assert any("ref2.png" in problem and "not found" in problem for problem in again.problems)


def test_the_sampler_draws_the_primary_alone_or_two_to_n_of_the_identitys_own_photos(toy):
    identities = read_manifest(toy).identities
    one = PlvmSampler(identities, seed=0)
    several = PlvmSampler(identities, seed=0, max_references=3)
    sizes = set()
    for identity in identities:
        own = {identity.reference, *identity.references}
        assert one.references_for(identity.name, 5, 0) == (identity.reference,)
        for step in range(40):
            drawn = several.references_for(identity.name, step, 1)
            assert drawn == several.references_for(identity.name, step, 1)  # (seed, name, step, micro) decide
            assert 1 <= len(drawn) <= 3 and len(set(drawn)) == len(drawn) and set(drawn) <= own
            assert len(drawn) > 1 or drawn == (identity.reference,)  # one photo: the primary
            sizes.add(len(drawn))
    assert sizes == {1, 2, 3}
    assert several.state_dict()["max_references"] == 3 and "max_references" not in one.state_dict()
    # the samples themselves do not change with max_references
    assert [one.sample(i) for i in range(20)] == [several.sample(i) for i in range(20)]


def test_a_training_concept_of_several_photos_is_the_concept_encode_makes(toy, runtime):
    identity = read_manifest(toy).identities[1]
    photos = (identity.reference, identity.references[1], identity.references[2])
    references = ReferenceTokens(runtime.encoder)
    references.prepare([identity], further=True)
    with torch.no_grad():
        [trained] = batch_concepts(runtime.aligner, [identity.name], references, runtime.device,
                                   reference_sets={identity.name: photos})
    encoded = encode_photos(runtime, identity.name, list(photos)).concept
    for part in ("word", "head", "context"):
        assert torch.allclose(getattr(trained, part).float(), getattr(encoded, part), atol=1e-5)
    assert not torch.allclose(trained.word.float(), runtime.encode_concept(identity.name, identity.reference).word)


def test_training_with_several_references_runs_and_learns(toy, runtime, tmp_path):
    config = TrainConfig(lr=1e-3, batch_size=2, steps=8, checkpoint_every=0, max_references=3,
                         data=str(toy), out=str(tmp_path / "run"), recognition_share=1.0)
    result = train_aligner(runtime, config)
    assert result.steps == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "run" / "aligner" / "model.safetensors").is_file()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["max_references"] == 3
