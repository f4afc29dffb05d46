"""`python -m plvmctl.lab.results`: what docs/results.md says, what it trains, how it refuses.

The fast tests build the document from synthetic evaluation results (no model runs); the one
slow test runs the whole command at toy size and reads the file it wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from test_evaluate import make_testset

from plvmctl.errors import PlvmError
from plvmctl.lab.pocket import profile
from plvmctl.recipe import load_recipe
from plvmctl.lab.results import (
    AblationRun,
    Options,
    StepRecord,
    StepRunner,
    ablation_plan,
    aligner_train_config,
    build_summary,
    committed_training,
    evaluation_overrides,
    main,
    mcq_chance,
    pocket_aligner_settings,
    render_results_markdown,
    several_photos_step,
    training_overrides,
)


# --------------------------------------------------------------------------------------------
# Synthetic inputs


def evaluation(methods: dict[str, tuple], identities: int = 40) -> dict:
    """An evaluation results dict as `run_evaluation` writes it.

    methods: name -> (positive, negative, visual, text, seconds per concept, tokens per concept)
    """
    results = {"counts": {"identities": identities, "query_photos": 6 * identities,
                          "recognition_items": 36 * identities,
                          "recognition_positive": 6 * identities,
                          "text_items": 6 * identities, "visual_items": 6 * identities},
               "protocol": {"mcq": "generate"}, "methods": {}}
    for name, (positive, negative, visual, text, seconds, tokens) in methods.items():
        results["methods"][name] = {
            "recognition": {"positive": positive, "negative": negative,
                            "mean": (positive + negative) / 2},
            "visual_qa": {"accuracy": visual}, "text_qa": {"accuracy": text},
            "seconds_per_concept": seconds, "tokens_per_concept": tokens,
            "skipped": {"total": 0}, "unparseable": {"total": 0},
            "negatives": (f"the test set's negatives/ folder (/sets/toy/negatives)"
                          if name in ("yollava", "myvlm", "mcllava") else None),
        }
    return results


def fake_testset():
    """Question rows only: visual questions with 2 and 3 options, text ones with 3 each."""
    row = lambda n, missing=None: SimpleNamespace(options=tuple("ABCD"[:n]), missing=missing)
    return SimpleNamespace(visual=[row(2), row(3), row(4, missing="missing file")],
                           text=[row(3), row(3)])


MAIN = {
    "plvm": (0.9, 0.7, 0.55, 0.65, 0.004, 16.0),
    "llava-none": (0.8, 0.2, 0.40, 0.35, 0.0, 0.0),
    "llava-text": (0.6, 0.5, 0.45, 0.50, 0.0125, 15.5),
    "yollava": (0.75, 0.75, 0.5, 0.6, 41.25, 16.0),
    "myvlm": (0.35, 0.85, 0.4, 0.45, 5.5, 1.0),
    "mcllava": (0.3, 0.8, 0.35, 0.4, 9.5, 16.0),
    "llava-truth": (0.95, 0.9, 0.6, 0.9, 0.0, 14.0),
}
ABLATION = {  # (w, k) -> plvm's numbers
    (1.0, 16): (0.5, 0.5, 0.30, 0.31, 0.005, 16.0),
    (20.0, 16): (0.9, 0.6, 0.32, 0.33, 0.005, 16.0),
    (20.0, 4): (0.7, 0.4, 0.34, 0.35, 0.003, 4.0),
    (20.0, 8): (0.8, 0.5, 0.36, 0.37, 0.004, 8.0),
}


def summary(options: Options | None = None, ablations: bool = True, identities: int = 40):
    options = options or Options()
    runs = None
    if ablations:
        runs = [(run, evaluation({"plvm": ABLATION[(run.yes_no_weight, run.num_context)]}),
                 {"seconds": 95.5, "final_loss": 0.675, "validation": {"val_mean": 0.5}})
                for run in ablation_plan()]
    steps = [StepRecord("testset", 1.5, False), StepRecord("main", 300.25, True)]
    machine = {"date": "2026-01-02T03:04:05+00:00", "device": "cpu", "torch": "9.9.9",
               "torch_threads": 1, "requested_threads": 1, "omp_num_threads": "1",
               "cpu_count": 2, "python": "3.11", "platform": "Linux", "processor": "x86_64"}
    main_results = evaluation({name: MAIN[name] for name in options.methods}, identities)
    return build_summary(options, fake_testset(), main_results, runs,
                         pocket_aligner_settings() if ablations else None, steps, machine)


def table_row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def section(markdown: str, title: str) -> str:
    """The text under heading `title` up to the next heading of any level."""
    start = markdown.index(title)
    rest = markdown[start + len(title):]
    following = re.search(r"^#{2,3} ", rest, flags=re.MULTILINE)
    return rest[:following.start()] if following else rest


# --------------------------------------------------------------------------------------------
# The document


def test_main_table_has_one_row_per_method_with_its_measured_numbers():
    markdown = render_results_markdown(summary())
    assert table_row(markdown, "pocket PLVM (`plvm`)") == [
        "pocket PLVM (`plvm`)", "90.0", "70.0", "80.0", "55.0", "65.0", "0.004", "16"]
    assert table_row(markdown, "pocket LVLM, no prompt (`llava-none`)")[1:] == [
        "80.0", "20.0", "50.0", "40.0", "35.0", "0", "0"]
    assert table_row(markdown, "pocket LVLM + ~16-token text prompt (`llava-text`)")[1:] == [
        "60.0", "50.0", "55.0", "45.0", "50.0", "0.0125", "15.5"]
    assert table_row(markdown, "Yo'LLaVA on the pocket LVLM (`yollava`)")[1:] == [
        "75.0", "75.0", "75.0", "50.0", "60.0", "41.2", "16"]
    assert table_row(markdown, "MyVLM on the pocket LVLM (`myvlm`)")[1:] == [
        "35.0", "85.0", "60.0", "40.0", "45.0", "5.5", "1"]
    assert table_row(markdown, "MC-LLaVA on the pocket LVLM (`mcllava`)")[1:] == [
        "30.0", "80.0", "55.0", "35.0", "40.0", "9.5", "16"]
    header = table_row(markdown, "method")
    assert header == ["method", "recognition positive", "recognition negative",
                      "recognition mean", "visual MCQ", "text MCQ", "seconds to add a concept",
                      "tokens per concept"]


def test_ablation_tables_vary_w_at_k16_and_k_at_w20():
    markdown = render_results_markdown(summary())
    weights = section(markdown, "### Yes/No weight w (k = 16)")
    assert table_row(weights, "1")[1:6] == ["50.0", "50.0", "50.0", "30.0", "31.0"]
    assert table_row(weights, "20")[1:6] == ["90.0", "60.0", "75.0", "32.0", "33.0"]
    assert table_row(weights, "20")[-1] == "95.5"  # training seconds
    contexts = section(markdown, "### Context tokens k (w = 20)")
    assert table_row(contexts, "4")[1:7] == ["70.0", "40.0", "55.0", "34.0", "35.0", "4"]
    assert table_row(contexts, "8")[1:7] == ["80.0", "50.0", "65.0", "36.0", "37.0", "8"]
    assert table_row(contexts, "16")[1:7] == ["90.0", "60.0", "75.0", "32.0", "33.0", "16"]
    data_rows = [line for line in contexts.splitlines() if re.match(r"\| \d", line)]
    assert len(data_rows) == 3


def test_the_document_says_where_each_trained_method_took_its_negatives_from():
    markdown = render_results_markdown(summary())
    line = next(line for line in markdown.splitlines() if line.startswith("- Negatives of the methods that train"))
    for name in ("yollava", "myvlm", "mcllava"):
        assert f"{name}: the test set's negatives/ folder (/sets/toy/negatives)" in line
    assert "plvm:" not in line and "llava-text" not in line
    without = render_results_markdown(summary(Options(skip_trained=True)))
    assert "- Negatives of the methods that train" not in without


def test_the_document_shows_the_paired_comparison_and_the_accuracy_per_question():
    statistics = {
        "paired": {"llava-text": {
            "all": {"items": 1440, "both_right": 1200, "only_first": 51, "only_second": 16, "p_value": 2.1689e-05},
            "positives": {"items": 240, "both_right": 180, "only_first": 38, "only_second": 11,
                          "p_value": 0.00011}}},
        "questions": {"text": {"plvm": {"What is <sks>'s hair color?": {"items": 40, "correct": 39, "accuracy": 0.975}},
                               "llava-text": {"What is <sks>'s hair color?": {"items": 40, "correct": 20,
                                                                               "accuracy": 0.5}}},
                      "visual": {"plvm": {}, "llava-text": {}}}}
    base = summary()
    markdown = render_results_markdown({**base, "statistics": statistics})
    paired = section(markdown, "## PLVM against each method, answer by answer")
    assert table_row(paired, "`llava-text`") == ["`llava-text`", "1440", "51", "16", "2e-05",
                                                 "240", "38", "11", "1e-04"]
    text = section(markdown, "### Text MCQ")
    assert table_row(text, "What is <sks>'s hair color?") == ["What is <sks>'s hair color?", "97.5 (40)", "50.0 (40)"]
    assert "### Visual MCQ" not in markdown  # nothing answered there
    stated = {"plvm": {"hair": {"stated": 200, "wrong": 1}, "skin": {"stated": 100, "wrong": 3}}}
    markdown = render_results_markdown({**base, "statistics": {**statistics, "stated_traits": stated}})
    traits = section(markdown, "### Traits stated wrongly inside recognition answers")
    assert table_row(traits, "`plvm`") == ["`plvm`", "0.5 (200)", "3.0 (100)"]
    assert "answer by answer" not in render_results_markdown({**base, "statistics": None})


def test_reading_note_gives_the_chance_levels_of_this_test_set():
    markdown = render_results_markdown(summary())
    note = section(markdown, "## How to read the numbers")
    assert "mean of 50 %" in note and "always says Yes" in note
    # visual: mean of 1/2 and 1/3 (the row with a missing photo is not asked); text: 1/3
    assert "visual 41.7 %, text 33.3 %" in note
    assert mcq_chance(fake_testset().visual) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert mcq_chance([]) is None


def test_command_machine_and_step_times_are_recorded():
    options = Options(out_dir=Path("runs/r"), doc=Path("docs/r.md"), aligner_steps=50,
                      skip_trained=True)
    markdown = render_results_markdown(summary(options))
    assert ("OMP_NUM_THREADS=1 python -m plvmctl.lab.results --out-dir runs/r --doc docs/r.md "
            "--testset runs/toy-testset --identities 40 --neg-per-identity 30 "
            "--aligner-steps 50 --threads 1 --skip-trained") in markdown
    assert "torch 9.9.9 with 1 thread(s)" in markdown and "2 CPU cores" in markdown
    assert "2026-01-02T03:04:05+00:00" in markdown
    assert table_row(markdown, "testset") == ["testset", "1.5"]
    assert table_row(markdown, "main (reused from an earlier run: its time then)")[1] == "300.2"


def test_skipped_parts_and_smoke_runs_say_so():
    markdown = render_results_markdown(summary(Options(skip_trained=True, skip_ablations=True),
                                               ablations=False, identities=4))
    assert "(`yollava`)" not in markdown and "(`myvlm`)" not in markdown and "(`mcllava`)" not in markdown
    assert "--skip-trained" in markdown
    assert "Not run this time (--skip-ablations)." in markdown
    assert "**Smoke run**: 4 identities" in markdown
    assert "Smoke run" not in render_results_markdown(summary())


# --------------------------------------------------------------------------------------------
# The ablation plan


def test_ablation_plan_is_four_aligners():
    plan = ablation_plan()
    assert [(run.yes_no_weight, run.num_context) for run in plan] == [
        (1.0, 16), (20.0, 16), (20.0, 4), (20.0, 8)]
    assert len({run.name for run in plan}) == 4
    assert AblationRun(20.0, 16).name == "w20-k16"


def _card(folder: Path, **settings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    full = profile("full")
    trained = {"aligner_steps": full.aligner_steps, "aligner_yes_no_weight": 20.0, "num_context": 16,
               "identities": full.identities, "aligner_several_steps": 0} | settings
    (folder / "card.json").write_text(json.dumps({
        "seed": 0, "settings": trained,
        "aligner": {"training_seconds": 512.5, "final_loss": 0.125,
                    "validation_recognition": {"val_mean": 0.95}}}))


def test_the_committed_aligner_is_the_shared_run_when_trained_as_the_profile_says(tmp_path, monkeypatch):
    import plvmctl.lab.pocket as pocket

    monkeypatch.setattr(pocket, "ASSETS", tmp_path / "pocket")
    settings = pocket_aligner_settings()
    _card(tmp_path / "pocket")
    assert committed_training(settings) == {"seconds": 512.5, "final_loss": 0.125,
                                            "validation": {"val_mean": 0.95}, "committed": True}
    for changed in ({"aligner_steps": 10}, {"aligner_yes_no_weight": 1.0}, {"num_context": 8},
                    {"aligner_several_steps": 2000}):  # the ablations train the one-photo part only
        _card(tmp_path / "pocket", **changed)
        assert committed_training(settings) is None, changed


def test_the_document_says_when_the_shared_row_is_the_committed_aligner():
    made = summary()
    assert "is trained again here" in render_results_markdown(made)
    for row in made["ablations"]["num_context"] + made["ablations"]["yes_no_weight"]:
        row["committed"] = row["yes_no_weight"] == 20.0 and row["num_context"] == 16
    assert "row is the committed Aligner itself" in render_results_markdown(made)


def test_each_aligner_is_trained_as_the_pocket_one_except_w_and_k(tmp_path):
    full = profile("full")
    settings = pocket_aligner_settings()
    for run in ablation_plan():
        config = aligner_train_config(run, settings, tmp_path / "manifest.jsonl", tmp_path / "out")
        assert config.yes_no_weight == run.yes_no_weight
        assert (config.steps, config.batch_size, config.lr, config.val_identities) == (
            full.aligner_steps, full.aligner_batch, full.aligner_lr, full.aligner_val_identities)
        assert config.aligner_sizes == full.aligner_sizes
        assert (config.schedule, config.positive_share, config.recognition_share) == (
            "cosine", 0.6, 0.5)
        config.validate()
        # k is the recipe's: a new Aligner (no aligner.path) gets aligner.num_context
        trained = load_recipe("pocket", training_overrides(run)).aligner
        assert trained.path is None and trained.num_context == run.num_context
        folder = tmp_path / "odd: name #1" / "aligner"
        evaluated = load_recipe("pocket", evaluation_overrides(run, folder)).aligner
        assert evaluated.path == str(folder.resolve())
        assert evaluated.num_context == run.num_context
    assert (settings["identities"], settings["photos"]) == (full.identities, full.photos)


# --------------------------------------------------------------------------------------------
# Steps and errors


def test_a_finished_step_is_reused_only_with_the_same_settings(tmp_path):
    calls, said, cleared = [], [], []
    steps = StepRunner(tmp_path, echo=said.append)
    work = lambda: calls.append(1)
    settings = {"negatives": 30, "methods": {"plvm": {"plvmctl": {"source_sha256": "aaa"}}}}
    assert not steps.run("main", settings, work, done=lambda: True).reused
    assert steps.run("main", settings, work, done=lambda: True).reused
    assert len(calls) == 1
    assert not steps.run("main", settings, work, done=lambda: False).reused  # outputs gone
    assert len(calls) == 2 and cleared == []
    new_code = {**settings, "methods": {"plvm": {"plvmctl": {"source_sha256": "bbb"}}}}
    record = steps.run("main", new_code, work, done=lambda: True, afresh=lambda: cleared.append(1))
    assert not record.reused and len(calls) == 3 and cleared == [1]
    assert 'step main: made with other settings (methods.plvm.plvmctl.source_sha256: "aaa" -> "bbb"), run afresh' \
        in said[-3]
    assert steps.run("main", new_code, work, done=lambda: True).reused  # the new settings are the marker's


def test_an_interrupted_step_runs_again(tmp_path):
    steps = StepRunner(tmp_path, echo=lambda message: None)

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steps.run("train", {"k": 4}, crash, done=lambda: True)
    calls = []
    assert not steps.run("train", {"k": 4}, lambda: calls.append(1), done=lambda: True).reused
    assert calls == [1]


@pytest.mark.parametrize("arguments, message", [
    (["--identities", "1"], "--identities must be at least 2"),
    (["--neg-per-identity", "-1"], "--neg-per-identity must be 0 or more"),
    (["--aligner-steps", "0"], "--aligner-steps must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--doc", "{tmp}"], "is a folder"),
    (["--out-dir", "{tmp}/file"], "exists and is not a folder"),
    (["--testset", "{tmp}/file"], "exists and is not a folder"),
])
def test_argument_errors_are_one_line(tmp_path, arguments, message):
    (tmp_path / "file").write_text("x")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    result = CliRunner().invoke(main, ["--out-dir", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_a_toy_testset_of_another_size_is_refused(tmp_path):
    testset = tmp_path / "testset"
    (testset / "validation_recognition").mkdir(parents=True)
    (testset / "toy_world.json").write_text(json.dumps({"identities": {"a": "1", "b": "2"}}))
    result = CliRunner().invoke(main, ["--out-dir", str(tmp_path / "out"),
                                       "--testset", str(testset), "--identities", "40"])
    assert result.exit_code == 1
    assert "toy test set of 2 identities, not 40: pass --identities 2" in result.output


def test_help_explains_the_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for words in ("docs/results.md", "--skip-trained", "--aligner-steps", "w = 1 vs 20",
                  "k = 4 / 8 / 16", "--out-dir"):
        assert words in result.output


# --------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_whole_command_at_toy_size(tmp_path):
    """4 identities, 5 Aligner steps: every step runs, the doc holds the run's numbers."""
    doc = tmp_path / "docs" / "results.md"
    arguments = ["--out-dir", str(tmp_path / "out"), "--doc", str(doc),
                 "--testset", str(tmp_path / "testset"), "--identities", "4",
                 "--aligner-steps", "5", "--skip-several-photos"]  # (its own test below)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    markdown = doc.read_text(encoding="utf-8")
    written = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))

    for row in written["main"]:  # the document's main table is the run's own numbers
        cells = table_row(markdown, f"{row['title']} (`{row['method']}`)")
        assert cells[3] == f"{100 * row['mean']:.1f}"
        assert cells[5] == f"{100 * row['text_qa']:.1f}"
    assert [row["method"] for row in written["main"]] == [
        "plvm", "llava-none", "llava-text", "yollava", "myvlm", "mcllava", "llava-truth"]
    assert [row["num_context"] for row in written["ablations"]["num_context"]] == [4, 8, 16]
    assert [row["yes_no_weight"] for row in written["ablations"]["yes_no_weight"]] == [1.0, 20.0]
    for row in written["ablations"]["num_context"]:
        assert row["tokens_per_concept"] == row["num_context"]
    for run in ablation_plan():
        assert (tmp_path / "out" / "ablations" / run.name / "train" / "aligner"
                / "model.safetensors").is_file()
    assert "**Smoke run**: 4 identities" in markdown
    assert "--identities 4 --neg-per-identity 30 --aligner-steps 5 --threads 1 --skip-several-photos" in markdown
    main_results = json.loads((tmp_path / "out" / "main" / "results.json").read_text(encoding="utf-8"))
    for name, paired in written["statistics"]["paired"].items():  # every answered item, paired
        scored = main_results["methods"][name]["recognition"]
        assert paired["all"]["items"] == scored["positive_total"] + scored["negative_total"], name
        assert paired["positives"]["items"] == scored["positive_total"], name
    assert set(written["negatives"]) == {"yollava", "myvlm", "mcllava"}
    assert all(origin.startswith("the test set's negatives/ folder") for origin in written["negatives"].values())
    assert "## PLVM against each method, answer by answer" in markdown
    assert "### Text MCQ" in markdown and "### Traits stated wrongly" in markdown
    assert f"5 steps (--aligner-steps; the profile has {profile('full').aligner_steps})" in markdown

    again = CliRunner().invoke(main, arguments)  # everything finished: reused, same numbers
    assert again.exit_code == 0, again.output
    assert "step train-w20-k4: reused" in again.output
    rewritten = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert rewritten["main"] == written["main"]
    assert rewritten["ablations"] == written["ablations"]


def test_the_document_says_how_multiple_choice_was_read():
    data = summary()
    assert data["protocol"]["mcq"] == "generate"  # what the evaluation ran with
    assert "letter read where it stands" in render_results_markdown(data)
    data["protocol"]["mcq"] = "likelihood"
    assert "the option whose letter the model finds most likely" in render_results_markdown(data)


def test_render_only_writes_the_doc_again_from_a_finished_run_with_its_item_statistics(tmp_path):
    from plvmctl.evaluate import build_items, load_testset

    root = make_testset(tmp_path / "set")
    items = build_items(load_testset(root))
    out = tmp_path / "out"
    methods = {}
    for name, always_yes in (("plvm", False), ("llava-text", True)):  # plvm always right
        records = [{"key": item.key, "mode": "generate", "error": None,
                    "answer": "yes" if always_yes and item.task == "recognition" else item.expected}
                   for task in ("recognition", "text") for item in items[task]]
        (out / "main" / "items").mkdir(parents=True, exist_ok=True)
        (out / "main" / "items" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        methods[name] = {"items_file": f"items/{name}.jsonl"}
    main_results = {"testset": str(root), "methods": methods,
                    "protocol": {"limit": None, "neg_per_identity": None, "seed": 0, "mcq": "generate"}}
    (out / "main" / "results.json").write_text(json.dumps(main_results))
    (out / "results.json").write_text(json.dumps(summary()))
    doc = tmp_path / "results.md"
    result = CliRunner().invoke(main, ["--out-dir", str(out), "--doc", str(doc), "--render-only"])
    assert result.exit_code == 0, result.output
    markdown = doc.read_text(encoding="utf-8")
    positives = sum(item.expected == "yes" for item in items["recognition"])
    negatives = len(items["recognition"]) - positives
    # llava-text is right on the positives only, plvm on everything: plvm alone right on the negatives
    assert table_row(section(markdown, "## PLVM against each method, answer by answer"), "`llava-text`")[:4] == [
        "`llava-text`", str(len(items["recognition"])), str(negatives), "0"]
    assert "written again on" in markdown and "no step run again" in markdown
    assert json.loads((out / "results.json").read_text())["statistics"]["paired"]["llava-text"]["all"]["only_first"] \
        == negatives
    missing = CliRunner().invoke(main, ["--out-dir", str(tmp_path / "none"), "--doc", str(doc), "--render-only"])
    assert missing.exit_code != 0 and "needs a finished run's --out-dir" in missing.output


def test_the_document_shows_the_questions_of_several_people_for_every_method():
    base = summary()
    pairs = {"recognition": {"positive": 0.25, "negative": 0.75, "unparseable": 0},
             "which": {"accuracy": 0.5, "items": 4, "unparseable": 1},
             "which3": {"accuracy": 0.25, "items": 4, "unparseable": 0},
             "both": {"positive": 1.0, "negative": 0.0, "unparseable": 0},
             "left_of": {"accuracy": 0.5, "items": 2, "unparseable": 0},
             "who4": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "unparseable": 2}}
    caption = {"recall": 0.9, "photos_all_named": 0.8, "named": 9, "pairs": 10, "name_precision": 0.75,
               "photos_naming_absent": 0.3}
    several = {"methods": {"plvm": {"pairs": pairs, "caption": caption}, "llava-none": {"pairs": None, "caption": None}}}
    markdown = render_results_markdown({**base, "several": several})
    assert "## Several people at once" in markdown
    table = section(markdown, "### Several concepts in one question")
    assert table_row(table, "plvm") == ["plvm", "25.0", "75.0", "50.0", "25.0", "100.0", "0.0", "50.0",
                                        "50.0", "25.0", "33.3", "3"]
    captions = section(markdown, "### Caption recall (MyVLM's metric) and name precision")
    assert table_row(captions, "plvm") == ["plvm", "90.0", "80.0", "9 / 10", "75.0", "30.0"]
    assert "llava-none" not in table  # asked nothing of several concepts
    assert "Several people at once" not in render_results_markdown({**base, "several": None})


def test_several_photos_step_measures_each_condition_and_the_document_shows_it(tmp_path):
    """PLVM with 1, 2, 4 clean and hard references on 3 toy identities: six evaluations whose
    numbers the document's table repeats; clean-1 is the primary reference alone."""
    options = Options(out_dir=tmp_path / "out", identities=3, neg_per_identity=2, skip_trained=True)
    steps = StepRunner(tmp_path / "out", echo=lambda message: None)
    made = several_photos_step(options, tmp_path / "out" / "several-photos", steps)
    assert list(made["conditions"]) == ["clean-1", "clean-2", "clean-4", "hard-1", "hard-2", "hard-4"]
    views = tmp_path / "out" / "several-photos" / "views"
    for folder in (views / "hard-4" / "validation_recognition").iterdir():
        if folder.is_dir():
            assert sorted(p.name for p in folder.glob("ref_img*")) == ["ref_img.png", "ref_img2.png",
                                                                      "ref_img3.png", "ref_img4.png"]
            assert (folder / "ref_img.png").resolve().name == "ref_img2.png"  # hard ones only
    base = summary(Options(skip_trained=True), identities=3)
    markdown = render_results_markdown({**base, "several_photos": made})
    text = section(markdown, "## Concepts from several photos")
    for label, rows in made["conditions"].items():
        assert table_row(text, label)[1] == f"{100 * rows['plvm']['recognition']['mean']:.1f}"
    gain = 100 * (made["conditions"]["hard-4"]["plvm"]["recognition"]["mean"]
                  - made["conditions"]["hard-1"]["plvm"]["recognition"]["mean"])
    assert f"{gain:+.1f} points" in text
    assert "## Concepts from several photos" not in render_results_markdown(base)
