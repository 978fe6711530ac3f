"""Tuning protocols read nothing beyond their reach; tuned files and the runs that use them say which
protocol made them; held-out streams differ from, and never collide with, evaluation streams."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from harness.core.data import Scenario, TensorSource
from harness.core.errors import UserError
from harness.core.streams import HELD_OUT_BASE, TuningProtocol, held_out_seed, is_held_out
from harness.engine.runner import MAX_SEED, RunSpec, get_scenario
from harness.orchestration.tune import tune
from scenarios.base import SCENARIOS, ScenarioOptions, ScenarioSpec, class_order, class_split_tasks
from tests.conftest import needs_fmnist

N_CLASSES, N_TASKS, PER_CLASS_TRAIN, PER_CLASS_TEST = 6, 3, 40, 10


@dataclass
class SpyOptions(ScenarioOptions):
    """Options of the instrumented scenario (the common ones: val_fraction and the caps)."""

    shuffle_classes: bool = False


class SpySource(TensorSource):
    """A data source that records every read as (stream seed, task index, split); a read of an index
    outside every split of its stream fails the test."""

    reads: ClassVar[list[tuple[int, int, str]]] = []

    def __init__(self, seed: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.owner: dict[int, tuple[int, str]] = {}

    def batches(self, indices, batch_size, *, shuffle, generator, device, train=False):
        for i in set(indices.tolist()):
            task, split = self.owner[i]
            SpySource.reads.append((self.seed, task, split))
        return super().batches(indices, batch_size, shuffle=shuffle, generator=generator, device=device, train=train)


def build_spy(opts: SpyOptions, seed: int, data_root: str | None) -> Scenario:
    """Six Gaussian classes in 8x8 images, three class-incremental tasks; every build (every stream)
    has its own recording source tagged with the stream seed it was built from."""
    g = torch.Generator().manual_seed(1234)  # the data pool is the same for every stream
    n_train, n_test = N_CLASSES * PER_CLASS_TRAIN, N_CLASSES * PER_CLASS_TEST
    ty = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS_TRAIN)
    vy = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS_TEST)
    centres = torch.randn(N_CLASSES, 1, 8, 8, generator=g) * 2
    y = torch.cat([ty, vy])
    x = centres[y] + torch.randn(len(y), 1, 8, 8, generator=g)
    source = SpySource(seed, x, y)
    tasks = class_split_tasks(source, ty, vy, n_train, class_order(N_CLASSES, opts.shuffle_classes, seed),
                              N_TASKS, opts, seed)
    for t in tasks:
        for split in ("train", "val", "test"):
            for i in getattr(t, f"{split}_idx").tolist():
                source.owner[i] = (t.id, split)
    assert len(source.owner) == n_train + n_test
    return Scenario("spy-stream", "class", tasks, N_CLASSES, (1, 8, 8), "mlp")


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setitem(SCENARIOS, "spy-stream", ScenarioSpec("spy-stream", SpyOptions, build_spy,
                                                              "instrumented test scenario", "mlp"))
    from harness.engine import runner

    monkeypatch.setattr(runner, "_SCENARIO_CACHE", {})
    SpySource.reads = []
    yield SpySource.reads
    SpySource.reads = []


def _tune(method, tuning, tmp_path, seeds=(0,)):
    return tune(method, "spy-stream", trials=2, results_dir=tmp_path, tracking_uri="none", show_progress=False,
                seeds=list(seeds), tuning=tuning, pruner="none", sampler_seed=0)


@pytest.mark.parametrize("method", ["ft", "er", "joint"])
def test_first_tasks_tuning_reads_only_the_first_k_tasks_train_and_validation(spy, tmp_path, method):
    out = _tune(method, TuningProtocol("first-tasks", 2), tmp_path, seeds=(0, 1))
    reads = set(spy)
    assert reads, "the spy saw no read"
    assert {s for s, _, _ in reads} == {0, 1}  # the evaluation streams of the run seeds, nothing else
    assert {t for _, t, _ in reads} == {0, 1}  # tasks 0 and 1 only: task 2 (index >= K) is never read
    assert {sp for _, _, sp in reads} == {"train", "val"}  # never the test split
    assert out["tuning"] == {"protocol": "first-tasks", "first_tasks": 2}
    assert "first 2 task(s)" in out["objective"]


@pytest.mark.parametrize("method", ["ft", "er"])
def test_held_out_tuning_never_reads_the_evaluation_stream(spy, tmp_path, method):
    _tune(method, TuningProtocol("held-out-stream"), tmp_path, seeds=(0, 1))
    reads = set(spy)
    assert reads
    assert {s for s, _, _ in reads} == {held_out_seed(0), held_out_seed(1)}  # only held-out streams
    assert all(is_held_out(s) for s, _, _ in reads)
    assert {t for _, t, _ in reads} == {0, 1, 2} and {sp for _, _, sp in reads} == {"train", "val"}


def test_end_of_stream_reads_every_task_but_never_test(spy, tmp_path):
    # The spy does see reads beyond K when a protocol makes them: end-of-stream reads task 2.
    _tune("ft", TuningProtocol(), tmp_path)
    reads = set(spy)
    assert {t for _, t, _ in reads} == {0, 1, 2} and {s for s, _, _ in reads} == {0}
    assert "test" not in {sp for _, _, sp in reads}


def test_the_evaluation_run_reads_the_test_split_the_spy_would_catch(spy):
    """The spy records test reads when they happen (a normal evaluation run reads them)."""
    from harness.engine.runner import run

    run(RunSpec("ft", "spy-stream", 0))
    assert {sp for _, _, sp in spy} == {"train", "test"}


def test_tune_suite_cli_records_the_protocol_in_files_and_runs(spy, tmp_path):
    from harness.cli.dmkd import main

    suite = tmp_path / "spy.yaml"
    suite.write_text("name: spy\nseeds: [0, 1]\nprotocol: {epochs: 1, batch_size: 32}\n"
                     "tuning: {protocol: first-tasks, first_tasks: 2}\nscenarios: [spy-stream]\n"
                     "methods:\n  - ft\n  - {name: er, label: er-20, set: {buffer_size: 20}}\n")
    res = tmp_path / "res"
    assert main(["tune-suite", str(suite), "--trials", "2", "--results", str(res), "--tracking-uri", "none"]) == 0
    assert {t for _, t, _ in spy} == {0, 1} and "test" not in {sp for _, _, sp in spy}
    path = tmp_path / "tuned" / "spy" / "first-tasks-2" / "seed0" / "spy-stream.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["tuning"] == {"protocol": "first-tasks", "first_tasks": 2}
    assert doc["command"].startswith(f"dmkd tune-suite {suite} --protocol first-tasks --first-tasks 2 --trials 2 "
                                     "--sampler-seed 0 --seeds 0")
    assert main(["suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", "none"]) == 0
    recs = [json.loads(p.read_text()) for p in (res / "spy" / "runs").glob("*.json")]
    assert len(recs) == 4
    assert all(r["tuning"] == {"protocol": "first-tasks", "first_tasks": 2, "sampler_seed": 0} for r in recs)
    assert all(r["eval_split"] == "test" and r["n_tasks"] == 3 for r in recs)  # evaluated on the whole stream
    # The same suite with the CLI switch reads another protocol's folder, which does not exist yet.
    assert main(["suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", "none",
                 "--protocol", "held-out-stream", "--tuned-dir", str(tmp_path / "nowhere")]) == 2


def test_bad_protocol_input_is_one_error_line(capsys, tmp_path):
    from harness.cli.dmkd import main

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nscenarios: [split-fmnist]\nmethods: [ft]\ntuning: {protocol: first-tasks}\n")
    assert main(["tune-suite", str(suite), "--trials", "1", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first-tasks needs a number of tasks K" in err[0]
    assert main(["tune", "--method", "ft", "--scenario", "split-fmnist", "--first-tasks", "0",
                 "--protocol", "first-tasks", "--results", str(tmp_path)]) == 2
    assert "K >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["tune-suite", str(suite), "--protocol", "last-tasks"])
    assert e.value.code == 2
    with pytest.raises(UserError, match="applies to the first-tasks protocol only"):
        TuningProtocol("held-out-stream", 2)


def test_first_tasks_k_must_leave_tasks_unseen(spy):
    with pytest.raises(UserError, match="covers the whole 3-task stream"):
        get_scenario(RunSpec("ft", "spy-stream", 0, eval_split="val", stream={"protocol": "first-tasks",
                                                                               "first_tasks": 3}))
    with pytest.raises(UserError, match="validation data only"):
        get_scenario(RunSpec("ft", "spy-stream", 0, stream={"protocol": "held-out-stream"}))


def test_stream_seeds_never_collide_with_run_seeds():
    # torch's CPU generator keeps the low 32 bits of its seed: seeds equal modulo 2**32 draw alike.
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(2**32 + 7)
    assert torch.equal(torch.randperm(50, generator=a), torch.randperm(50, generator=b))
    # So stream seeds are, modulo 2**32, above every run seed: no run can draw a held-out stream.
    assert HELD_OUT_BASE == MAX_SEED + 1
    for s in (0, 1, 2, 12345, MAX_SEED):
        assert MAX_SEED < held_out_seed(s) % 2**32 == held_out_seed(s) < 2**32 and is_held_out(held_out_seed(s))
        assert not is_held_out(s)
    with pytest.raises(UserError, match="not an integer in"):
        from harness.engine.runner import validate_seed

        validate_seed(HELD_OUT_BASE)


@needs_fmnist
def test_held_out_streams_are_other_streams_of_the_same_family():
    small = {"max_train_per_task": 200, "max_test_per_task": 60}
    for name, opts in (("split-fmnist", small), ("permuted-fmnist", {**small, "n_tasks": 3}),
                       ("rotated-fmnist", {**small, "n_tasks": 3})):
        ev = get_scenario(RunSpec("ft", name, 0, scenario_set=opts))
        ho = get_scenario(RunSpec("ft", name, 0, scenario_set=opts, eval_split="val",
                                  stream={"protocol": "held-out-stream"}))
        assert len(ho.tasks) == len(ev.tasks) and ho.num_classes == ev.num_classes
        # Its training and validation samples are training images of the data set (the first 60,000
        # indices), its test split test images (sealed in tuning); another draw than the evaluation's.
        assert all(int(torch.cat([t.train_idx, t.val_idx]).max()) < 60000 for t in ho.tasks)
        assert all(int(t.test_idx.min()) >= 60000 for t in ho.tasks)
        assert not all(torch.equal(a.val_idx, b.val_idx) for a, b in zip(ev.tasks, ho.tasks))
        x = next(ev.tasks[1].batches("train", 8))[0]
        if name == "split-fmnist":
            assert [t.classes for t in ho.tasks] != [t.classes for t in ev.tasks]  # another class order
            assert sorted(c for t in ho.tasks for c in t.classes) == list(range(10))
        else:  # other permutations / rotations: the same image transformed otherwise
            assert not torch.allclose(ev.tasks[1].transform(x), ho.tasks[1].transform(x))
    # Evaluation streams are unchanged by all this: seed 0's split-fmnist keeps classes in order.
    ev = get_scenario(RunSpec("ft", "split-fmnist", 0, scenario_set=small))
    assert [t.classes for t in ev.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@needs_fmnist
@pytest.mark.slow
def test_tune_suite_files_are_identical_whatever_the_workers_and_rerun_by_their_command(tmp_path, monkeypatch):
    """One study per row, its trials in sequence: 1 worker and 2 workers write the same bytes, for two
    sampler seeds; the command a file records regenerates it, byte for byte, in a fresh results folder."""
    import shlex

    from harness.cli.dmkd import main

    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "tiny.yaml"
    suite.write_text("name: tiny\nseeds: [0]\nprotocol: {epochs: 1, batch_size: 64}\nscenarios:\n"
                     "  - {name: split-fmnist, options: {max_train_per_task: 200, max_test_per_task: 60}}\n"
                     "methods:\n  - ft\n  - {name: er, label: er-50, set: {buffer_size: 50}}\n")
    base = ["tune-suite", "tiny.yaml", "--protocol", "held-out-stream", "--trials", "3", "--sampler-seed", "0,1",
            "--tracking-uri", "none"]
    out = tmp_path / "tuned" / "tiny" / "held-out-stream"
    files = [out / "seed0" / "split-fmnist.yaml", out / "seed1" / "split-fmnist.yaml"]

    assert main(base + ["--results", "res1", "--workers", "1"]) == 0
    one = [f.read_bytes() for f in files]
    assert main(base + ["--results", "res2", "--workers", "2"]) == 0
    two = [f.read_bytes() for f in files]
    assert one == two
    docs = [yaml.safe_load(b) for b in one]
    # Different sampler seeds are different searches (their first learning rates differ).
    assert docs[0]["entries"]["ft"]["params"] != docs[1]["entries"]["ft"]["params"]
    assert [d["sampler_seed"] for d in docs] == [0, 1] and all(d["tuning"] == {"protocol": "held-out-stream"}
                                                               for d in docs)
    # The recorded command, run as written into a fresh results folder, gives the same file.
    command = docs[1]["command"]
    assert command == ("dmkd tune-suite tiny.yaml --protocol held-out-stream --trials 3 --sampler-seed 1 "
                       "--seeds 0 --pruner median --threads 1")
    files[1].unlink()
    assert main(shlex.split(command)[1:] + ["--results", "res3", "--tracking-uri", "none"]) == 0
    assert files[1].read_bytes() == one[1]
    run_info = yaml.safe_load(files[1].with_suffix(".run.yaml").read_text())
    assert set(run_info["rows"]) == {"ft", "er-50"} and "res3" in run_info["rows"]["ft"]["storage"]


def test_held_out_domain_stream_keeps_the_run_seeds_test_split_and_draws_another_order(tmp_path):
    """PACS draws each domain's train/test split from the seed: the held-out stream keeps the test
    split of the run seed it derives from (never trains or validates on its test images), in another
    domain order, and the evaluation stream is built exactly as before."""
    from scenarios.base import build_scenario
    from tests.test_scenarios_images import PACS_CLASSES, write_domains

    write_domains(tmp_path / "PACS", ["art_painting", "cartoon", "photo", "sketch"], PACS_CLASSES, 12)
    opts = {"image_size": 8, "augment": False, "val_fraction": 0.25, "max_train_per_task": 20}
    for seed in (0, 1):
        ev = build_scenario("pacs", opts, seed, str(tmp_path))
        ho = build_scenario("pacs", opts, held_out_seed(seed), str(tmp_path))
        by_name = {t.name: t for t in ev.tasks}
        assert sorted(t.name for t in ho.tasks) == sorted(by_name)
        for t in ho.tasks:
            e = by_name[t.name]
            test = set(e.test_idx.tolist())
            assert set(t.test_idx.tolist()) == test  # the same test images, sealed in tuning
            assert not (set(t.train_idx.tolist()) | set(t.val_idx.tolist())) & test
        assert [t.name for t in ho.tasks] != [t.name for t in ev.tasks] or any(
            not torch.equal(a.val_idx, by_name[a.name].val_idx) for a in ho.tasks)
