"""The command line as a user meets it: output, exit codes, one-line errors, files kept."""

import json

import pytest
import torch
from click.testing import CliRunner

from plvmctl.aligner import released_key_shapes, AlignerConfig
from plvmctl.cli import main


@pytest.fixture()
def cli(tmp_path):
    store = tmp_path / "store"

    def run(*args, recipe="tiny", input=None):
        result = CliRunner().invoke(main, ["--recipe", recipe, "--store", str(store), *map(str, args)],
                                    input=input)
        return result

    run.store = store
    return run


def test_encode_then_ask(cli, photos):
    result = cli("encode", photos["plain0.png"], "--name", "avril")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(cli.store / "avril.concept")
    answer = cli("ask", photos["plain1.png"], "Where is <avril>?")
    assert answer.exit_code == 0, answer.output
    assert answer.output.strip()  # the tiny model's answer is gibberish, but it answers


def test_encode_refuses_to_overwrite(cli, photos):
    assert cli("encode", photos["plain0.png"], "--name", "avril").exit_code == 0
    before = (cli.store / "avril.concept").read_bytes()
    again = cli("encode", photos["plain1.png"], "--name", "avril")
    assert again.exit_code == 1
    assert "already exists" in again.output and "--force" in again.output
    assert (cli.store / "avril.concept").read_bytes() == before
    assert cli("encode", photos["plain1.png"], "--name", "avril", "--force").exit_code == 0
    assert (cli.store / "avril.concept").read_bytes() != before


@pytest.mark.parametrize("name, words", [("corrupt.jpg", "corrupt"), ("text.png", "not a readable image"),
                                         ("missing.png", "not found")])
def test_encode_bad_reference_is_one_line(cli, photos, name, words):
    result = cli("encode", photos[name], "--name", "x")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and words in result.output
    assert not (cli.store / "x.concept").exists()


def test_ask_several_images_reports_failures_and_goes_on(cli, photos):
    cli("encode", photos["plain0.png"], "--name", "avril")
    result = cli("ask", photos["plain1.png"], photos["corrupt.jpg"], photos["rgba.png"], "Is <avril> here?", "--json")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["error"] is None for row in rows] == [True, False, True]
    assert "failed:" in result.stderr and "corrupt.jpg" in result.stderr


def test_ask_unknown_name_lists_known(cli, photos):
    cli("encode", photos["plain0.png"], "--name", "avril")
    result = cli("ask", photos["plain1.png"], "Is <zoe> here?")
    assert result.exit_code == 1
    assert "unknown concept <zoe>" in result.output and "<avril>" in result.output


def test_ask_batch_file_and_no_image(cli, photos, tmp_path):
    cli("encode", photos["plain0.png"], "--name", "avril")
    cli("encode", photos["plain1.png"], "--name", "bob")
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join([
        json.dumps({"image": str(photos["photo.jpg"]), "question": "Is <avril> with <bob>?"}),
        "not json",
        json.dumps({"image": str(photos["palette.png"]), "question": "Where is <bob>?"}),
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    result = cli("ask", "--batch", queries, "--out", out)
    assert result.exit_code == 1  # the bad line fails, the others are answered
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["error"] is None for row in rows] == [True, False, True]
    assert "line 2" in rows[1]["error"]
    text_only = cli("ask", "--no-image", "What colour is the hair of <bob>?")
    assert text_only.exit_code == 0, text_only.output


def test_concepts_list_show_rm(cli, photos):
    assert "no concepts" in cli("concepts", "list").output
    cli("encode", photos["plain0.png"], "--name", "avril")
    assert cli("concepts", "list").output.startswith("<avril>\tplvm\tk=4")
    shown = json.loads(cli("concepts", "show", "avril").output)
    assert shown["method"] == "plvm" and shown["k"] == 4 and len(shown["reference_sha256"]) == 64
    assert cli("concepts", "rm", "avril").exit_code == 0
    assert cli("concepts", "show", "avril").exit_code == 1


def test_concept_from_another_model_is_refused(cli, photos):
    cli("encode", photos["plain0.png"], "--name", "avril", recipe="tiny")
    other = cli("--set", "model.seed=1", "ask", photos["plain1.png"], "Is <avril> here?")
    assert other.exit_code == 1
    assert "made for model" in other.output and "re-encode" in other.output


def test_chat_session(cli, photos):
    script = f"/add avril {photos['plain0.png']} {photos['plain2.png']}\n/image {photos['plain1.png']}\nIs <avril> here?\n/concepts\n/bogus\n/quit\n"
    result = cli("chat", input=script)
    assert result.exit_code == 0, result.output
    assert "saved" in result.output and "bot> " in result.output and "<avril>" in result.output
    assert "unknown command /bogus" in result.output


def test_recipe_errors_are_one_line(cli, tmp_path, photos):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    result = cli("concepts", "list", recipe=bad)
    assert result.exit_code == 1 and "malformed recipe" in result.output
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  sorce: tiny\n")
    result = cli("concepts", "list", recipe=typo)
    assert result.exit_code == 1 and "unknown key 'sorce'" in result.output
    assert "unknown recipe" in cli("concepts", "list", recipe="nope").output
    wrong = cli("--set", "generation.max_new_tokens=many", "ask", "--no-image", "hi")
    assert wrong.exit_code == 1 and "expected an integer" in wrong.output


def test_missing_aligner_says_how_to_get_one(cli, photos, tmp_path):
    result = cli("--set", f"aligner.path={tmp_path / 'nowhere'}", "encode", photos["plain0.png"], "--name", "a")
    assert result.exit_code == 1
    assert "aligner import" in result.output and "train aligner" in result.output


def test_aligner_import_command(tmp_path, cli, photos):
    config = AlignerConfig(layout="released", encoder_dim=32, lm_dim=32, num_context=4, released_heads=2,
                           released_dim_head=16, released_depth=2, head_mapping_hidden=32)
    state = {key: torch.randn(shape) * 0.05 for key, shape in released_key_shapes(config).items()}
    checkpoint = tmp_path / "checkpoint.ckpt"
    torch.save(state, checkpoint)
    # the default (real) sizes do not fit this small checkpoint: a clear error
    refused = CliRunner().invoke(main, ["aligner", "import", str(checkpoint), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "error:" in refused.output
    missing = CliRunner().invoke(main, ["aligner", "import", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_ask_sampling_flags_are_seeded(cli, photos):
    """`--seed` decides a sampled answer: the same seed twice gives the same output, four
    seeds give more than one."""
    cli("encode", photos["plain0.png"], "--name", "avril")

    def ask(seed: int) -> str:
        result = cli("ask", photos["plain1.png"], "Is <avril> here?", "--sample", "--temperature", "1.5",
                     "--max-new-tokens", "8", "--seed", seed)
        assert result.exit_code == 0, result.output
        return result.output

    assert ask(3) == ask(3)
    assert len({ask(seed) for seed in range(4)}) > 1
    greedy = cli("ask", photos["plain1.png"], "Is <avril> here?", "--temperature", "1.5")
    assert greedy.exit_code == 1 and "unused with sampling off" in greedy.output


def test_the_product_never_imports_the_laboratory():
    """plvmctl.lab (toy world, pocket build, results, demo) stays apart: loading the CLI, the
    engine, the trainers and the evaluation leaves it unimported."""
    import subprocess
    import sys

    code = ("import sys, plvmctl.cli, plvmctl.engine, plvmctl.evaluate, plvmctl.methods, plvmctl.train, "
            "plvmctl.train.per_concept, plvmctl.methods.yollava.trainer, plvmctl.image_index; "
            "print(sorted(m for m in sys.modules if m.startswith('plvmctl.lab')))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_recipes_lists_the_named_recipes_and_marks_the_default():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = {line.split("\t")[0]: line.split("\t") for line in result.output.splitlines()}
    assert {"pocket (default)", "tiny", "llava15-7b", "train-tiny"} <= set(lines)
    assert lines["pocket (default)"][1] == "The pocket model of the toy world"
    assert lines["tiny"][2].endswith("tiny.yaml")


def test_without_recipe_the_pocket_model_answers_and_loading_is_quiet(tmp_path, photos):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    store = ["--store", str(tmp_path / "store"), "--device", "cpu"]
    loud = CliRunner().invoke(main, ["-v", "--recipe", "pocket", *store, "encode", str(photos["plain0.png"]),
                                     "--name", "avril"])
    assert loud.exit_code == 0, loud.output
    assert "Loading weights" in loud.output  # what -v still shows
    quiet = CliRunner().invoke(main, [*store, "ask", str(photos["plain1.png"]), "is <avril> in this photo?"])
    assert quiet.exit_code == 0, quiet.output
    assert "Loading weights" not in quiet.output and quiet.output.strip()


def test_aligner_import_of_a_pickled_module_is_refused_in_one_line(tmp_path):
    checkpoint = tmp_path / "checkpoint.ckpt"
    torch.save(torch.nn.Linear(2, 2), checkpoint)
    result = CliRunner().invoke(main, ["aligner", "import", str(checkpoint), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ") and "holds pickled Python objects" in line
    assert "weights_only" not in result.output and not (tmp_path / "x").exists()
