"""Checkpoints and output directories from someone else: refused in one line, nothing lost.

A checkpoint's ``.metadata`` is a pickle; one that would run code is refused by every entry
point before anything unpickles it. Each case names its exact message and checks that no
file was deleted and no partial output was left.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from hpd_megatron.errors import CheckpointError, ConfigError
from tests.tool_runs import load_tool, run_main

ROOT = Path(__file__).resolve().parent.parent
MATH_RECIPE = ROOT / "recipes/qwen2.5_7b_to_1.5b_math_hpd.yaml"


class _Payload:
    """What an attacker pickles into ``.metadata``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _fake_checkpoint(directory: Path, marker: Path | None = None) -> Path:
    """A model-only checkpoint with no tensors; with ``marker``, its index carries a payload."""
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    index = Metadata(state_dict_metadata={}, storage_data={})
    if marker is not None:
        index.planner_data = _Payload(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(index))
    torch.save({}, directory / "common.pt")
    return directory


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def hostile(tmp_path) -> dict:
    """A tampered checkpoint (and a training run that resumes from one), and its marker."""
    marker = tmp_path / "payload_ran"
    weights = _fake_checkpoint(tmp_path / "evil", marker)
    run = tmp_path / "evil_run"
    _fake_checkpoint(run / "iter_0000001", marker)
    _fake_checkpoint(run / "iter_0000000")  # an earlier save, intact
    (run / "latest_checkpointed_iteration.txt").write_text("1\n")
    before = _files(tmp_path)
    yield {"weights": weights, "run": run, "marker": marker, "root": tmp_path}
    assert not marker.exists()
    assert {k: v for k, v in _files(tmp_path).items() if k in before} == before
    assert not list(tmp_path.rglob("*.partial"))


def _refusal(index_file: Path) -> str:
    return (
        f"{index_file}: refused: names pathlib.Path.touch, which a checkpoint index never "
        "holds (a tampered or foreign file; nothing was loaded)"
    )


def test_the_payload_runs_under_plain_pickle(tmp_path):
    # The control: without the restricted reader this file runs code when read.
    directory = _fake_checkpoint(tmp_path / "ckpt", tmp_path / "ran")
    pickle.loads((directory / ".metadata").read_bytes())
    assert (tmp_path / "ran").exists()


def test_weights_load_refuses_a_tampered_index(hostile):
    from hpd_megatron.checkpoint.weights import load_model_weights

    for path, index in (
        (hostile["weights"], hostile["weights"] / ".metadata"),
        (hostile["run"], hostile["run"] / "iter_0000001" / ".metadata"),
    ):
        with pytest.raises(CheckpointError) as error:
            load_model_weights(None, path)  # refused before the model is touched
        assert str(error.value) == _refusal(index)


def test_resume_refuses_a_tampered_index(hostile):
    from hpd_megatron.checkpoint.checkpointer import Checkpointer
    from hpd_megatron.training.config import CheckpointConfig

    checkpointer = Checkpointer(CheckpointConfig(), hostile["run"], 10, 0)
    try:
        assert checkpointer.latest_step() == 1
        with pytest.raises(CheckpointError) as error:
            checkpointer.resume(1, None, None, None)
    finally:
        checkpointer.close()
    run = hostile["run"]
    assert str(error.value) == _refusal(run / "iter_0000001" / ".metadata") + (
        f"; {run / 'iter_0000000'} is intact: to resume from it, write 0 into "
        f"{run / 'latest_checkpointed_iteration.txt'}"
    )


def test_the_converter_back_to_hf_refuses_a_tampered_index(hostile):
    out = hostile["root"] / "hf_out"
    code, stderr = run_main(
        load_tool("convert_megatron_to_hf").main,
        ["--ckpt", str(hostile["weights"]), "--out", str(out)],
    )
    assert (code, stderr) == (1, f"error: {_refusal(hostile['weights'] / '.metadata')}\n")
    assert not out.exists()


@pytest.mark.parametrize("name", [".metadata", "common.pt"])
def test_a_truncated_index_or_common_state_is_one_line(tmp_path, name):
    directory = _fake_checkpoint(tmp_path / "ckpt")
    damaged = directory / name
    damaged.write_bytes(damaged.read_bytes()[:-20])
    before = _files(tmp_path)
    code, stderr = run_main(
        load_tool("convert_megatron_to_hf").main,
        ["--ckpt", str(directory), "--out", str(tmp_path / "hf_out")],
    )
    expected = {
        ".metadata": "unreadable (UnpicklingError: pickle data was truncated)",
        "common.pt": "truncated or damaged (File is not a zip file)",
    }[name]
    assert (code, stderr) == (1, f"error: {damaged}: {expected}\n")
    assert _files(tmp_path) == before


def _recipe_inputs(root: Path, monkeypatch, teacher: Path) -> None:
    """The math recipe's inputs: ``teacher``, a plain student checkpoint and data files."""
    student = _fake_checkpoint(root / "student")
    data = root / "data" / "train"
    data.parent.mkdir()
    for suffix in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx"):
        Path(str(data) + suffix).write_text("")
    Path(str(data) + ".json").write_text("{}")  # a sidecar that records no tokenizer
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HPD_TEACHER_CKPT", str(teacher))
    monkeypatch.setenv("HPD_STUDENT_CKPT", str(student))
    monkeypatch.setenv("HPD_DATA", str(data))
    monkeypatch.setenv("HPD_RUN_DIR", str(root / "run"))


def test_plan_check_inputs_and_the_trainers_input_check_refuse_a_tampered_index(
    hostile, monkeypatch
):
    from hpd_megatron.plan import main as plan_main
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.inputs import check_inputs

    _recipe_inputs(hostile["root"], monkeypatch, hostile["weights"])
    expected = f"teacher.checkpoint: {_refusal(hostile['weights'] / '.metadata')}"
    args = ["--config", str(MATH_RECIPE), "--nodes", "1", "--check-inputs"]
    assert run_main(plan_main, args) == (1, f"error: {expected}\n")
    with pytest.raises(ConfigError) as error:
        check_inputs(load_run_config(str(MATH_RECIPE)))
    assert str(error.value) == expected


@pytest.mark.parametrize("tool", ["evaluate", "generate_data"])
def test_evaluate_and_generate_data_refuse_a_tampered_index(hostile, tool):
    data = hostile["root"] / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    out = hostile["root"] / "out"
    if tool == "evaluate":
        from hpd_megatron.evaluate import main
    else:
        main = load_tool("generate_data").main
    argv = ["--ckpt", str(hostile["weights"]), "--data", str(data), "--out", str(out)]
    assert run_main(main, argv) == (1, f"error: {_refusal(hostile['weights'] / '.metadata')}\n")
    assert not out.exists()


def test_no_checkpoint_loads_while_torch_is_told_to_unpickle_freely(tmp_path, monkeypatch):
    from hpd_megatron.checkpoint.training_state import saved_extra
    from hpd_megatron.checkpoint.verify import read_index

    plain = _fake_checkpoint(tmp_path / "plain")
    read_index(plain)  # a plain index passes
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    expected = (
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: torch would load a checkpoint's common.pt "
        "with plain pickle, which runs any code the file names; unset it to load checkpoints"
    )
    with pytest.raises(CheckpointError) as error:
        read_index(plain)
    assert str(error.value) == expected
    with pytest.raises(CheckpointError) as error:
        saved_extra(tmp_path, 0)
    assert str(error.value) == expected


def _fake_export(directory: Path) -> Path:
    _fake_checkpoint(directory)
    (directory / "model.yaml").write_text("family: llama\n")
    return directory


def _publish_on_each_rank(outs: list[str]) -> list[str]:
    """Rank body: publish a one-file directory at each of ``outs``; "published" or the error."""
    import torch.distributed as dist

    from hpd_megatron.checkpoint.publish import publish_directory
    from hpd_megatron.checkpoint.weights import not_an_export

    dist.init_process_group("gloo")
    results = []
    for out in outs:
        try:
            with publish_directory(out, refuse=not_an_export) as partial:
                if dist.get_rank() == 0:
                    (partial / "metadata.json").write_text("{}")
            results.append("published")
        except CheckpointError as error:
            results.append(str(error))
    dist.destroy_process_group()
    return results


def test_an_export_replaces_only_a_previous_export_and_every_rank_agrees(tmp_path):
    from tests.multiprocess import run_on_ranks

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    foreign_leftover = tmp_path / "export"
    (tmp_path / "export.previous").mkdir()
    (tmp_path / "export.previous" / "notes.txt").write_text("mine")
    again = _fake_export(tmp_path / "again")
    _fake_export(tmp_path / "again.previous")  # left by an export killed while renaming
    kept = {k: v for k, v in _files(tmp_path).items() if not k.startswith("again")}

    results = run_on_ranks(_publish_on_each_rank, 2, [str(run), str(foreign_leftover), str(again)])
    refusal = "; refusing to replace it (remove it or choose another)"
    assert (
        results
        == [
            [
                f"{run}: not a previous export (it holds metrics.jsonl, which an export never "
                f"writes){refusal}",
                f"{tmp_path / 'export.previous'}: not a previous export (it holds notes.txt, "
                f"which an export never writes){refusal}",
                "published",
            ]
        ]
        * 2
    )
    # Nothing refused was deleted or half-written; the previous export was replaced.
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith("again")} == kept
    assert not foreign_leftover.exists() and not list(tmp_path.glob("*.partial"))
    assert sorted(p.name for p in again.iterdir()) == ["metadata.json"]
    assert not (tmp_path / "again.previous").exists()


def test_an_export_dir_over_the_run_is_refused_at_start(tmp_path, monkeypatch):
    from hpd_megatron.checkpoint.checkpointer import Checkpointer
    from hpd_megatron.training.config import load_run_config

    _recipe_inputs(tmp_path, monkeypatch, _fake_checkpoint(tmp_path / "teacher"))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = _files(tmp_path)
    cases = {
        str(run_dir): f"checkpoint.export_dir: {run_dir} is or contains the run_dir {run_dir}",
        str(tmp_path): f"checkpoint.export_dir: {tmp_path} is or contains the run_dir {run_dir}",
        str(tmp_path / "notes"): (
            f"checkpoint.export_dir: {tmp_path / 'notes'}: not a previous export (it holds "
            "todo.txt, which an export never writes); refusing to replace it (remove it or "
            "choose another)"
        ),
    }
    for export_dir, message in cases.items():
        run = load_run_config(str(MATH_RECIPE), [f"checkpoint.export_dir={export_dir}"])
        with pytest.raises(ConfigError) as error:
            Checkpointer.for_run(run)
        if "is or contains" in message:
            message += (
                ", which the export would replace; choose a directory of its own "
                "(e.g. RUN_DIR/export)"
            )
        assert str(error.value) == message
    assert _files(tmp_path) == before


def test_keep_last_below_one_is_refused_at_load_time(tmp_path, monkeypatch):
    from hpd_megatron.training.config import load_run_config

    _recipe_inputs(tmp_path, monkeypatch, _fake_checkpoint(tmp_path / "teacher"))
    with pytest.raises(ConfigError) as error:
        load_run_config(str(MATH_RECIPE), ["checkpoint.keep_last=0"])
    assert str(error.value) == f"{MATH_RECIPE}: checkpoint.keep_last: must be >= 1, got 0"


def test_retention_keeps_the_tracked_save_beside_a_stale_newer_one(tmp_path):
    from hpd_megatron.checkpoint.training_state import complete_steps, remove_old_checkpoints

    for step in (1, 2, 3, 9):  # 9: left by another run in this directory
        _fake_checkpoint(tmp_path / f"iter_{step:07d}")
    (tmp_path / "iter_0000004.partial").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    remove_old_checkpoints(tmp_path, keep_last=1)
    assert complete_steps(tmp_path) == [3, 9]
    assert (tmp_path / "iter_0000004.partial").is_dir()  # not retention's to remove
    remove_old_checkpoints(tmp_path, keep_last=5)
    assert complete_steps(tmp_path) == [3, 9]


def test_evaluate_never_tracks_to_a_store_the_checkpoint_names(tmp_path, monkeypatch):
    from hpd_megatron.eval.source import CheckpointInfo
    from hpd_megatron.eval.tracking import tracking_target

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "r"
    named = {"enabled": True, "tracking_uri": "https://collector.invalid/", "experiment": "exp"}
    info = CheckpointInfo(tmp_path, None, tmp_path, "auto", 1, {"tracking": named}, "run1")
    assert tracking_target(info, None, None) is None
    info.training = {"run_dir": str(run_dir), "tracking": {"enabled": True}}  # its SQLite
    assert tracking_target(info, None, None) is None
    assert not run_dir.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    info.training = {"tracking": named}
    target = tracking_target(info, None, None)
    assert (target.tracking_uri, target.experiment) == ("http://mine:5000", "exp")
    assert tracking_target(info, "sqlite:///x.db", None).tracking_uri == "sqlite:///x.db"


def test_a_second_job_on_a_run_directory_fails_naming_the_holder(tmp_path, monkeypatch):
    import socket
    import subprocess

    from hpd_megatron.checkpoint.run_lock import RUN_LOCK, acquire

    lock_file = tmp_path / RUN_LOCK
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = acquire(lock_file, f"run_dir {tmp_path}")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        with pytest.raises(CheckpointError) as error:
            acquire(lock_file, f"run_dir {tmp_path}")
        assert str(error.value) == (
            f"run_dir {tmp_path}: in use by another job (host {socket.gethostname()}, pid "
            f"{os.getpid()}, Slurm job 4242; lock file {lock_file}); wait for it to end, or "
            "stop it, or choose another directory"
        )
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued: takes it over
        acquire(lock_file, f"run_dir {tmp_path}").release()
    finally:
        first.release()
    # A dead job whose lock outlives it (a child still holds the file) is taken over.
    monkeypatch.delenv("SLURM_JOB_ID")
    dead = subprocess.Popen(["true"])
    dead.wait()
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(lock_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "locked\n"
        lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
        lock = acquire(lock_file, f"run_dir {tmp_path}")
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        child.kill()
        child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_LOCK]


_HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_resumed_run_logs_no_step_twice(tmp_path):
    from hpd_megatron.training.metrics import JsonlSink

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "lo')  # killed mid-line after step 4
    sink = JsonlSink(path)  # the last save was after step 2: the run resumes at 3
    sink.log_metrics({"loss": 0.5}, 3)
    sink.log_metrics({"loss": 0.25}, 4)
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()][2:] == [0.5, 0.25]


def test_two_runs_sharing_a_checkpoint_dir_outside_their_run_dirs(setup, tmp_path):
    """Their retention would delete each other's saves: the second job stops at start-up."""
    from hpd_megatron.checkpoint.run_lock import RUN_LOCK, acquire
    from tests.multiprocess import run_on_ranks
    from tests.training_runs import train_on_rank

    shared = tmp_path / "shared_checkpoints"
    first = acquire(shared / RUN_LOCK, f"checkpoint.dir {shared}")  # the first job's lock
    overrides = [f"run_dir={tmp_path / 'second'}", f"checkpoint.dir={shared}"]
    try:
        with pytest.raises(pytest.fail.Exception) as error:  # a rank raised
            run_on_ranks(train_on_rank, 1, setup["recipe"], overrides)
    finally:
        first.release()
    assert f"checkpoint.dir {shared}: in use by another job (host " in str(error.value)
    assert sorted(p.name for p in shared.iterdir()) == [RUN_LOCK]


def test_a_second_conversion_to_one_out_fails_naming_the_holder(tmp_path):
    from hpd_megatron.checkpoint.run_lock import acquire, output_lock_path
    from tests.test_bad_inputs import _hf_model

    source = _hf_model(tmp_path / "hf")
    out = tmp_path / "out"
    first = acquire(output_lock_path(out), f"--out {out}", remove_on_release=True)
    try:
        code, err = run_main(
            load_tool("convert_hf_to_megatron").main,
            ["--hf-dir", str(source), "--out", str(out), "--no-progress"],
        )
    finally:
        first.release()
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().startswith(f"error: --out {out}: in use by another job (host ")
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))


def _train_with_a_full_disk_at_step_2(recipe: str, overrides: list[str]) -> dict:
    """Train with every tensor write of the step-2 save failing as on a full disk."""
    import errno
    import functools

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tests.training_runs import train_on_rank

    write = filesystem_async._write_item

    @functools.wraps(write)  # Megatron inspects its signature
    def full_at_step_2(*args, **kwargs):
        if any("iter_0000002" in str(getattr(a, "name", "")) for a in args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(*args, **kwargs)

    # Megatron's writer processes are forked from this one, so they inherit the patch.
    filesystem_async._write_item = full_at_step_2
    return train_on_rank(recipe, overrides)


def test_disk_full_while_saving_keeps_the_last_save(setup, tmp_path):
    from hpd_megatron.checkpoint.training_state import TRACKER
    from tests.multiprocess import run_on_ranks

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "checkpoint.save_interval=1", "schedule.train_steps=3"]
    with pytest.raises(pytest.fail.Exception) as error:
        run_on_ranks(_train_with_a_full_disk_at_step_2, 1, setup["recipe"], overrides)
    checkpoints = run_dir / "checkpoints"
    assert (
        f"CheckpointError: {checkpoints / 'iter_0000002.partial'}: no space left on the device "
        "while writing the checkpoint of step 2; nothing was published"
    ) in str(error.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000001", TRACKER]
    assert (checkpoints / TRACKER).read_text() == "1\n"


def _load_a_checkpoint_with_a_hostile_object(root: str) -> str:
    """A real model checkpoint whose first linear_proj's extra state (which the local spec
    loads too) is a payload; the load's error."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from hpd_megatron.checkpoint.dist_save import save_sharded
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from tests.training_runs import STUDENT

    initialize_parallel(ParallelLayout(1, 1), seed=1)
    description = ModelDescription.from_dict(STUDENT)
    model = build_gpt_model(description, transformer_config(description))
    state = model.sharded_state_dict()
    key = "decoder.layers.self_attention.linear_proj._extra_state"
    payload = _Payload(Path(root) / "payload_ran")
    layers = (description.num_layers,)
    state["decoder.layers.0.self_attention.linear_proj._extra_state"] = ShardedObject(
        key, payload, layers, (0,), replica_id=0
    )
    directory = Path(root) / "ckpt"
    directory.mkdir()
    save_sharded(state, directory)
    try:
        load_model_weights(model, directory)
    except CheckpointError as error:
        return str(error)
    finally:
        destroy_parallel()
    return "loaded"


def test_an_object_that_would_run_code_is_refused_before_the_load(tmp_path):
    """DCP reads every object (extra states, RNG states) with unrestricted torch.load."""
    from tests.multiprocess import run_on_ranks

    message = run_on_ranks(_load_a_checkpoint_with_a_hostile_object, 1, str(tmp_path))[0]
    assert not (tmp_path / "payload_ran").exists()
    assert message.startswith(f"{tmp_path / 'ckpt'}/__0_0.distcp: refused: object ")
    key = "decoder.layers.self_attention.linear_proj._extra_state/shard_0_2"
    assert f"'{key}' names getattr, which a checkpoint's objects never hold" in message
    assert message.endswith("a tampered or foreign file; nothing was loaded)")
