"""Every tensor a model, a loss or a collective is handed lives on the model's device.

There is no GPU here, so the current device is replaced by ``meta`` (a device that holds
no data): anything the product leaves on the host shows up as ``cpu`` at the model, the
loss or the collective, each replaced by a spy that records the devices it was handed.
The product's own paths run: the trainer's feed, the schedule's step function, the
objective's forward step and loss; the divergence evaluation; the converters' verify.
Where a path cannot go on with data-less tensors, the spy stops it once it has recorded.

The same process (they take long to start) first runs the divergence evaluation for real on
the CPU and checks its numbers against a dense computation from the models' full logits.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from tests.multiprocess import run_on_ranks
from tests.training_runs import SEQ, STUDENT, TEACHER, save_initial_weights

META = torch.device("meta")
CPU = torch.device("cpu")


class Recorded(Exception):
    """Raised by a spy that has what it needs, to stop a path that cannot go on."""


def devices(tensors: dict) -> dict[str, str]:
    return {name: value.device.type for name, value in tensors.items() if value is not None}


def place_on_meta() -> None:
    """Make ``meta`` the current device, for everything the product moves there."""
    from hpd_megatron.parallel import placement

    placement.current_device = lambda: META


@pytest.fixture
def run(tmp_path, prepared_data):
    from hpd_megatron.training.config import load_run_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "student": {"model": STUDENT},
                "teacher": {"model": TEACHER, "checkpoint": str(tmp_path / "unused")},
                "data": {"train": prepared_data, "seq_length": SEQ},
                "loss": {"method": "hpd"},
                "schedule": {
                    "train_steps": 2,
                    "warmup_steps": 1,
                    "global_batch_size": 4,
                    "micro_batch_size": 2,
                },
            }
        )
    )
    return load_run_config(recipe)


def test_trainer_micro_batches_reach_the_model_and_the_loss_on_its_device(run, monkeypatch):
    """feed -> the schedule's step function -> the objective's forward step -> its loss."""
    from hpd_megatron.parallel import placement
    from hpd_megatron.training import objective as objective_module
    from hpd_megatron.training.feed import TrainingFeed
    from hpd_megatron.training.objective import DistillationObjective
    from hpd_megatron.training.schedule import placed_forward_step

    monkeypatch.setattr(placement, "current_device", lambda: META)
    student = dict(run.named_models())["student"]
    seen: dict[str, dict[str, str]] = {}

    def pair(batch):
        seen["model"] = devices(batch)
        logits = torch.zeros(*batch["tokens"].shape, student.vocab_size, device=META)
        return logits, logits.clone()

    def loss(logits, teacher_logits, labels, method, sampling, **kwargs):
        seen["loss"] = devices(
            {
                "student_logits": logits,
                "teacher_logits": teacher_logits,
                "labels": labels,
                "uniforms": sampling.uniforms,
            }
        )
        zero = logits.new_zeros(())
        return zero, {"loss_sum": zero, "num_tokens": zero, "loss": zero}

    monkeypatch.setattr(objective_module, "distillation_loss", loss)
    objective = DistillationObjective(run, student.vocab_size)
    step_function = placed_forward_step(partial(objective.forward_step, 1))
    micro_batches = iter(TrainingFeed(run, student, dp_rank=0, dp_size=1).next_step())
    for _ in range(2):
        output, loss_func = step_function(micro_batches, pair)
        loss_func(output)
        assert seen["model"] == {
            "tokens": "meta",
            "labels": "meta",
            "loss_mask": "meta",
            "position_ids": "meta",
            "sample_index": "cpu",  # HPD's seeds are computed from it on the host
        }
        assert set(seen["loss"].values()) == {"meta"}, seen["loss"]


def test_moving_to_the_cpu_returns_the_same_tensor():
    """On the CPU nothing is copied: CPU results stay bitwise those of before."""
    from hpd_megatron.training.schedule import batch_to_device

    batch = {"tokens": torch.arange(6).view(2, 3), "sample_index": torch.tensor([4, 5])}
    placed = batch_to_device(batch, CPU)
    assert all(placed[name] is batch[name] for name in batch)
    assert batch_to_device(batch, META)["sample_index"] is batch["sample_index"]


def _teacher_export(directory: str, tokenizer: str) -> Path:
    """On a rank: the initial weights, the teacher's as an export the evaluation reads."""
    save_initial_weights(directory)
    teacher = Path(directory) / "teacher"
    (teacher / "model.yaml").write_text(yaml.safe_dump(TEACHER))
    (teacher / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return teacher


def _sharper_student(directory: str) -> Path:
    """On a rank: the initial student with its output layer scaled up (peaked
    distributions), saved as a second checkpoint."""
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.eval.divergence import load_model
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.schedule import output_weight

    initialize_parallel(ParallelLayout(1, 1))
    model = load_model(Path(directory) / "student", ModelDescription.from_dict(STUDENT))
    with torch.no_grad():
        output_weight(model).mul_(12.0)
    save_model_weights(model, Path(directory) / "sharper")
    destroy_parallel()
    return Path(directory) / "sharper"


REAL_VOCAB = 120
"""The divergence evaluation's real vocabulary: below the output layers' 128 rows, whose
padding rows (random weights here) must take no probability."""


def _divergence_values(directory: str, heldout: str, teacher: Path) -> dict[str, dict]:
    """On a rank: the divergence evaluation's numbers (streamed through the fused head, in
    small chunks over several batches) and the same from the models' full logits, a float64
    log_softmax over the real vocabulary of the held-out set in one batch."""
    from hpd_megatron.eval.divergence import compare_with_teacher, load_model, sequence_batches
    from hpd_megatron.losses import IGNORE_INDEX
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.schedule import causal_lm_forward

    checkpoints = [Path(directory) / "student", _sharper_student(directory)]
    teacher = Path(shutil.copytree(teacher, Path(directory) / "teacher_real_vocab"))
    (teacher / "model.yaml").write_text(yaml.safe_dump({**TEACHER, "vocab_size": REAL_VOCAB}))
    student = ModelDescription.from_dict({**STUDENT, "vocab_size": REAL_VOCAB})
    streamed = compare_with_teacher(
        teacher, student, checkpoints, heldout, SEQ, batch_size=6, chunk_tokens=37
    )
    initialize_parallel(ParallelLayout(1, 1))
    with torch.no_grad():
        [batch] = sequence_batches(heldout, SEQ, batch_size=10**6)
        mask = batch["labels"] != IGNORE_INDEX

        def dense_log_probs(checkpoint, description) -> torch.Tensor:
            logits = causal_lm_forward(load_model(checkpoint, description), batch)
            assert logits.shape[-1] > REAL_VOCAB
            return torch.log_softmax(logits[..., :REAL_VOCAB].double(), dim=-1)[mask]

        lp = dense_log_probs(
            teacher, ModelDescription.from_dict({**TEACHER, "vocab_size": REAL_VOCAB})
        )
        dense = {"teacher_entropy": float(-(lp.exp() * lp).sum() / mask.sum()), "students": []}
        for checkpoint in checkpoints:
            lq = dense_log_probs(checkpoint, student)
            kl = float((lp.exp() * (lp - lq)).sum() / mask.sum())
            entropy = float(-(lq.exp() * lq).sum() / mask.sum())
            dense["students"].append({"kl_to_teacher": kl, "entropy": entropy})
        dense["tokens"] = int(mask.sum())
    destroy_parallel()
    return {"streamed": streamed, "dense": dense}


def _divergence_inputs(heldout: str, teacher: Path) -> dict[str, str]:
    """On a rank: the devices of the first batch the divergence evaluation's models see."""
    from hpd_megatron.eval import divergence
    from hpd_megatron.models.description import ModelDescription

    seen: dict[str, str] = {}

    def model_forward(model, batch):
        seen.update(devices(batch))
        raise Recorded

    place_on_meta()
    divergence.causal_lm_hidden_states = model_forward
    student = ModelDescription.from_dict(STUDENT)
    with pytest.raises(Recorded):
        divergence.compare_with_teacher(teacher, student, [teacher], heldout, SEQ, batch_size=4)
    return seen


def _verify_inputs() -> dict[str, dict[str, str]]:
    """On a rank: the devices the converters' verify hands its model and its collectives."""
    import torch.distributed as dist

    from hpd_megatron.convert import verify
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training import schedule

    description = ModelDescription.from_dict(STUDENT)
    initialize_parallel(ParallelLayout(1, 1))
    model = build_gpt_model(description, transformer_config(description))
    seen: dict[str, dict[str, str]] = {}

    def model_forward(stage, batch):
        seen["model"] = devices(batch)
        return torch.zeros(*batch["tokens"].shape, description.vocab_size, device=META)

    def collective(tensor, *args, **kwargs):
        seen.setdefault("collectives", {})[len(seen["collectives"])] = tensor.device.type
        raise Recorded

    place_on_meta()
    schedule.causal_lm_forward = model_forward
    dist.all_reduce = dist.broadcast = collective
    tokens = verify.prompt_tokens(None, description.vocab_size, batch=2, length=8)
    with pytest.raises(Recorded):  # 0: which rank reports
        verify._reporting_rank()
    with pytest.raises(Recorded):  # 1: the reporting rank sends its greedy token
        verify.megatron_greedy(model, tokens, description.vocab_size, steps=1, reporter=0)
    verify.megatron_logits = lambda *args: None  # as on a rank that does not report
    with pytest.raises(Recorded):  # 2: the others receive it
        verify.megatron_greedy(model, tokens, description.vocab_size, steps=1, reporter=0)
    destroy_parallel()
    return seen


def _any_rank_input() -> str:
    """On a rank: the device of the flag the trainer's ranks agree on (finite gradients)."""
    import torch.distributed as dist

    from hpd_megatron.parallel.collectives import any_rank
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1))
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        raise Recorded

    place_on_meta()
    dist.all_reduce = all_reduce
    with pytest.raises(Recorded):
        any_rank(True)
    destroy_parallel()
    return seen[0]


def _on_a_rank(directory: str, heldout: str, tokenizer: str) -> dict:
    """One process (they take long to start) for the paths that need process groups."""
    teacher = _teacher_export(directory, tokenizer)
    return {  # the values first: the others put the process on the meta device
        "divergence_values": _divergence_values(directory, heldout, teacher),
        "divergence": _divergence_inputs(heldout, teacher),
        "verify": _verify_inputs(),
        "any_rank": _any_rank_input(),
    }


@pytest.fixture(scope="module")
def seen_on_a_rank(tmp_path_factory, prepared_data) -> dict:
    tokenizer = Path(prepared_data).parent / "tokenizer.model"
    directory = tmp_path_factory.mktemp("weights")
    [seen] = run_on_ranks(_on_a_rank, 1, str(directory), prepared_data, str(tokenizer))
    return seen


def test_divergence_evaluation_feeds_its_models_on_their_device(seen_on_a_rank):
    assert seen_on_a_rank["divergence"] == {
        "tokens": "meta",
        "labels": "meta",
        "loss_mask": "meta",
        "position_ids": "meta",
    }


def test_divergence_evaluation_streamed_equals_dense_log_softmax(seen_on_a_rank):
    """KL(teacher || student) and both entropies from the fused head's chunks (37 tokens,
    batches of 6) equal a float64 log_softmax of the models' full logits over the real
    vocabulary (below the padded one), for two checkpoints loaded into one student (the
    second one's distributions peaked)."""
    streamed, dense = seen_on_a_rank["divergence_values"].values()
    assert streamed["tokens"] == dense["tokens"] > 0
    assert streamed["teacher_entropy"] == pytest.approx(dense["teacher_entropy"], rel=1e-6)
    assert len(streamed["students"]) == 2
    for got, want in zip(streamed["students"], dense["students"], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert streamed["students"][1]["entropy"] < streamed["students"][0]["entropy"] - 0.5


def test_converter_verify_feeds_model_and_collectives_on_the_device(seen_on_a_rank):
    assert seen_on_a_rank["verify"] == {
        "model": {"tokens": "meta", "position_ids": "meta"},
        "collectives": {0: "meta", 1: "meta", 2: "meta"},
    }


def test_ranks_agree_on_the_device(seen_on_a_rank):
    assert seen_on_a_rank["any_rank"] == "meta"


def test_the_loss_names_an_input_on_another_device():
    from hpd_megatron.losses import distillation_loss

    logits = torch.zeros(1, 3, 8)
    labels = torch.zeros(1, 3, dtype=torch.long, device=META)
    with pytest.raises(ValueError, match="labels: on meta, but student_logits are on cpu"):
        distillation_loss(logits, None, labels, "sft", vocab_size=8, tp_group=None)
