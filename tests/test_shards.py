"""Work split across processes (plvmctl.shards): who am I, which items are mine, the merge.

Ranks are played one after another in this process by setting RANK and WORLD_SIZE, as
accelerate launch and torchrun set them; tests/test_scaling_out.py launches real processes.
"""

import json

import pytest
from click.testing import CliRunner

from plvmctl import engine as engine_module
from plvmctl.cli import main
from plvmctl.errors import PlvmError
from plvmctl.shards import Process, ShardedRun, assign, current_process, item_key, parts_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


# -- which process am I --------------------------------------------------------------------
def test_one_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current_process() == Process(0, 1, 0)
    assert current_process().is_main and not current_process().several


def test_rank_and_world_from_the_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_process() == Process(3, 4, 1)
    assert not current_process().is_main


@pytest.mark.parametrize("rank, world, words", [("2", "2", "does not fit"), ("x", "2", "not a whole number")])
def test_a_rank_outside_the_world_is_refused(monkeypatch, rank, world, words):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(PlvmError, match=words):
        current_process()


# -- which items are mine ------------------------------------------------------------------
def test_shards_are_disjoint_cover_everything_and_are_in_input_order():
    costs = [5, 1, 1, 3, 2, 8, 1, 1, 4]
    shards = assign(costs, 3)
    everything = sorted(i for shard in shards for i in shard)
    assert everything == list(range(len(costs)))
    assert all(shard == sorted(shard) for shard in shards)
    assert assign(costs, 3) == shards  # every rank computes the same split


def test_shards_balance_cost_largest_first():
    # 8 → rank 0; 5 → rank 1; 4 → rank 1 (5 < 8); 3 → rank 0 (8 < 9); 1 → rank 1 (9 < 11)
    costs = [8, 5, 4, 3, 1]
    shards = assign(costs, 2)
    loads = [sum(costs[i] for i in shard) for shard in shards]
    assert shards == [[0, 3], [1, 2, 4]] and loads == [11, 10]
    expensive = [576] * 2 + [10] * 6  # two photos with many image tokens, six cheap questions
    heavy = assign(expensive, 2)
    assert [sum(expensive[i] for i in shard) for shard in heavy] == [606, 606]


def test_equal_costs_go_round_robin_and_one_process_takes_all():
    assert assign([1] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert assign([3, 1, 2], 1) == [[0, 1, 2]]
    assert assign([], 2) == [[], []]


# -- partial files and the merge -----------------------------------------------------------
def test_ranks_write_partial_files_and_rank_zero_merges_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    keys = [item_key("q", i) for i in range(5)]
    one = ShardedRun(out, keys, [1] * 5, Process(1, 2, 1))
    assert one.todo == [1, 3]
    one.save({i: {"i": i, "by": 1} for i in one.todo})
    assert ShardedRun(out, keys, [1] * 5, Process(1, 2, 1)).todo == []  # rank 1's part is done
    assert one.finish() is None  # not rank 0
    zero = ShardedRun(out, keys, [1] * 5, Process(0, 2, 0))
    assert zero.todo == [0, 2, 4]
    zero.save({0: {"i": 0, "by": 0}})
    with pytest.raises(PlvmError, match="2 of 5 items still unanswered"):
        zero.finish(timeout=0)
    zero.save({2: {"i": 2, "by": 0}, 4: {"i": 4, "by": 0}})
    assert [row["i"] for row in zero.finish(timeout=0)] == [0, 1, 2, 3, 4]
    ShardedRun.clean_after(out)
    assert not parts_folder(out).exists()


def test_a_changed_input_is_asked_again(tmp_path):
    out = tmp_path / "out.jsonl"
    keys = [item_key("q", i) for i in range(4)]
    run = ShardedRun(out, keys, [1] * 4, Process(0, 1, 0))
    run.save({i: i for i in range(4)})
    keys[2] = item_key("another question")
    assert ShardedRun(out, keys, [1] * 4, Process(0, 1, 0)).todo == [2]


def test_a_rerun_with_another_process_count_asks_only_what_is_missing(tmp_path):
    out = tmp_path / "out.jsonl"
    keys = [item_key(i) for i in range(6)]
    ShardedRun(out, keys, [1] * 6, Process(2, 3, 2)).save({2: "two", 5: "five"})  # ranks 0, 1 died
    rerun = [ShardedRun(out, keys, [1] * 6, Process(rank, 2, rank)) for rank in range(2)]
    assert rerun[0].todo == [0, 4] and rerun[1].todo == [1, 3]
    rerun[1].save({1: "one", 3: "three"})
    rerun[0].save({0: "zero", 4: "four"})
    assert rerun[0].finish(timeout=0) == ["zero", "one", "two", "three", "four", "five"]


def test_a_torn_partial_line_is_skipped(tmp_path):
    out = tmp_path / "out.jsonl"
    keys = [item_key(i) for i in range(2)]
    ShardedRun(out, keys, [1, 1], Process(0, 1, 0)).save({0: "zero"})
    with open(parts_folder(out) / "rank-0.jsonl", "a") as handle:
        handle.write('{"index": 1, "key": "')
    assert ShardedRun(out, keys, [1, 1], Process(0, 1, 0)).todo == [1]


# -- ask --batch across processes -----------------------------------------------------------
@pytest.fixture()
def batch(tmp_path, photos):
    """A store with <avril> and a batch file of photo questions, one of them broken."""
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["--recipe", "tiny", "--store", str(store), "encode",
                                     str(photos["plain0.png"]), "--name", "avril"]).exit_code == 0
    lines = [json.dumps({"image": str(photos[name]), "question": question}) for name, question in [
        ("plain1.png", "Is <avril> here?"), ("photo.jpg", "Where is <avril>?"),
        ("rgba.png", "Describe the photo."), ("corrupt.jpg", "Is <avril> here?"),
        ("plain2.png", "What is <avril> doing?")]]
    lines.insert(2, json.dumps({"image": None, "question": "What colour is <avril>'s hair?"}))
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(lines) + "\n")
    return store, queries


def ask_batch(store, queries, out):
    return CliRunner().invoke(main, ["--recipe", "tiny", "--store", str(store), "ask", "--batch",
                                     str(queries), "--out", str(out), "--batch-size", "2"])


@pytest.fixture()
def asked(monkeypatch):
    """Every question the engine is asked, in order."""
    questions = []
    real = engine_module.Engine.ask

    def ask(self, requests, **kwargs):
        questions.extend((r.question, str(r.image)) for r in requests)
        return real(self, requests, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "ask", ask)
    return questions


def test_ask_batch_over_two_ranks_equals_one_process(batch, tmp_path, monkeypatch, asked):
    store, queries = batch
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = ask_batch(store, queries, tmp_path / "one.jsonl")
    assert single.exit_code == 1  # the corrupt photo
    assert not parts_folder(tmp_path / "one.jsonl").exists()  # one process: no partial files
    once = list(asked)
    asked.clear()
    as_rank(monkeypatch, 1, 2)
    other = ask_batch(store, queries, tmp_path / "two.jsonl")
    assert other.exit_code == 0 and other.output == ""  # rank 1 leaves the report to rank 0
    assert not (tmp_path / "two.jsonl").exists()
    as_rank(monkeypatch, 0, 2)
    merged = ask_batch(store, queries, tmp_path / "two.jsonl")
    assert merged.exit_code == 1 and "5 answered, 1 failed" in merged.output
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(asked) == sorted(once)  # each question asked by exactly one rank
    assert not parts_folder(tmp_path / "two.jsonl").exists()


def test_ask_batch_resumes_a_dead_ranks_work_with_one_process(batch, tmp_path, monkeypatch, asked):
    store, queries = batch
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ask_batch(store, queries, tmp_path / "one.jsonl").exit_code == 1
    asked.clear()
    as_rank(monkeypatch, 1, 2)  # rank 1 finished its shard; rank 0 died before asking
    assert ask_batch(store, queries, tmp_path / "two.jsonl").exit_code == 0
    by_rank_one = list(asked)
    asked.clear()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rerun = ask_batch(store, queries, tmp_path / "two.jsonl")
    assert rerun.exit_code == 1
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not set(asked) & set(by_rank_one) and len(asked) + len(by_rank_one) == 6


# -- find --json across processes -----------------------------------------------------------
def test_find_json_over_two_ranks_equals_one_process(tmp_path, photos, monkeypatch):
    store = tmp_path / "store"
    for name, photo in (("avril", "plain0.png"), ("bob", "photo.jpg")):
        assert CliRunner().invoke(main, ["--recipe", "tiny", "--store", str(store), "encode",
                                         str(photos[photo]), "--name", name]).exit_code == 0
    album = [str(photos[name]) for name in ("plain1.png", "rgba.png", "text.png", "plain2.png", "gray.png")]

    def find():
        return CliRunner().invoke(main, ["--recipe", "tiny", "--store", str(store), "find", *album,
                                         "--json", "--threshold", "0.5"])

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = find()
    assert single.exit_code == 1  # text.png is no photo
    assert any(json.loads(line)["found"] for line in single.stdout.splitlines())
    as_rank(monkeypatch, 1, 2)
    other = find()
    assert other.exit_code == 0 and other.stdout == ""
    assert list((store / ".shards").glob("find-*.jsonl.parts/rank-1.jsonl"))
    as_rank(monkeypatch, 0, 2)
    merged = find()
    assert merged.exit_code == 1 and merged.stdout == single.stdout
    assert not list((store / ".shards").glob("*.parts"))


# -- index build across processes -----------------------------------------------------------
def test_index_build_over_two_ranks_equals_one_process(tmp_path, monkeypatch):
    from test_image_index import fake_app, make_photos

    from plvmctl.cli.index import index as index_group

    make_photos(tmp_path / "photos", count=9)

    def build(out):
        return CliRunner().invoke(index_group, ["build", str(tmp_path / "photos"), "--out", str(out),
                                                "--shard-size", "2", "--no-progress"], obj=fake_app())

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert build(tmp_path / "one.index").exit_code == 0
    as_rank(monkeypatch, 1, 2)
    other = build(tmp_path / "two.index")
    assert other.exit_code == 0 and other.stdout == "" and not (tmp_path / "two.index").exists()
    work = tmp_path / "two.index.embeddings"
    assert sorted(p.name for p in (work / "img_emb").iterdir()) == ["img_emb_1.npy", "img_emb_3.npy"]
    as_rank(monkeypatch, 0, 2)
    merged = build(tmp_path / "two.index")
    assert merged.exit_code == 0, merged.output
    assert "9 vectors" in merged.stdout and "reused 5 complete embeddings shard(s)" in merged.stderr  # all of them, its own too
    assert (tmp_path / "two.index").read_bytes() == (tmp_path / "one.index").read_bytes()


# -- eval across processes --------------------------------------------------------------------
def test_eval_ranks_ask_disjoint_shares_and_rank_zero_scores_them_all(tmp_path, monkeypatch):
    """Ranks played in turn (rank 1, then rank 0): rank 0 first folds rank 1's log in, as a
    rerun after a rank died does; tests/test_scaling_out.py runs them at once."""
    from test_evaluate import FakeApi, FakeRuntime, make_testset

    from plvmctl.evaluate import run as run_module
    from plvmctl.evaluate.split import EvalSplit

    root = make_testset(tmp_path / "set")
    methods = ["plvm", "llava-text"]
    one_api = FakeApi()
    single = run_module.run_evaluation(FakeRuntime(), root, methods, tmp_path / "one", progress=False,
                                       engine_api=one_api)
    class RankOneAfterRankZerosCheck(EvalSplit):
        """Rank 1 as it runs behind the barrier: after rank 0 checked the run folder."""

        def started(self, logs, check):
            check()
            return {}

    asked = {}
    for rank in (1, 0):
        split = RankOneAfterRankZerosCheck if rank == 1 else EvalSplit
        monkeypatch.setattr(run_module, "EvalSplit",
                            lambda runtime, rank=rank, split=split: split(runtime, Process(rank, 2, rank)))
        asked[rank] = FakeApi()
        results = run_module.run_evaluation(FakeRuntime(), root, methods, tmp_path / "two", progress=False,
                                            engine_api=asked[rank])
        if rank == 1:
            assert results == {}
            assert not (tmp_path / "two" / "report.md").exists()
            assert sorted(p.name for p in (tmp_path / "two" / "items").glob("*.parts")) == [
                "llava-text.jsonl.parts", "plvm.jsonl.parts"]
    assert asked[0].asked and asked[1].asked
    assert sorted(asked[0].asked + asked[1].asked) == sorted(one_api.asked)  # each item by one rank
    for name in methods:
        lines = (tmp_path / "two" / "items" / f"{name}.jsonl").read_text().splitlines()
        assert sorted(lines) == sorted((tmp_path / "one" / "items" / f"{name}.jsonl").read_text().splitlines())
        for key in ("recognition", "text_qa", "visual_qa"):
            assert results["methods"][name][key] == single["methods"][name][key]
    assert not list((tmp_path / "two" / "items").glob("*.parts"))


def test_index_build_of_vectors_is_left_to_rank_zero(tmp_path, monkeypatch):
    import numpy as np

    from plvmctl.cli.index import index as index_group

    np.save(tmp_path / "x.npy", np.eye(8, 4, dtype=np.float32) + 0.1)
    build = ["build", str(tmp_path / "x.npy"), "--out", str(tmp_path / "x.index"), "--no-progress"]
    as_rank(monkeypatch, 1, 2)
    other = CliRunner().invoke(index_group, build)
    assert other.exit_code == 0 and other.stdout == "" and not (tmp_path / "x.index").exists()
    as_rank(monkeypatch, 0, 2)
    built = CliRunner().invoke(index_group, build)
    assert built.exit_code == 0, built.output
    assert "8 vectors" in built.stdout and (tmp_path / "x.index").is_file()
