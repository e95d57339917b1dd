"""Shared pieces of the trainer and checkpoint tests: tiny models, initial weights, a run body.

All runs start from the same initial weights (saved once at TP1 PP1 and loaded through
dist_checkpointing) and read the same prepared data; only the layout changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

STEPS = 3
SEQ = 96
STUDENT = dict(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=128,
)
TEACHER = dict(
    family="qwen2",
    num_layers=4,
    hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=192,
    vocab_size=128,
)


def save_initial_weights(directory: str) -> None:
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=3)
    for name, kwargs in (("student", STUDENT), ("teacher", TEACHER)):
        description = ModelDescription.from_dict(kwargs)
        save_model_weights(
            build_gpt_model(description, transformer_config(description)), Path(directory) / name
        )
    destroy_parallel()


def train_on_rank(recipe: str, overrides: list[str]) -> dict:
    """Train on this rank; also report whether the teacher's weights stayed bit-identical."""
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    class TeacherWatchingTrainer(DistillationTrainer):
        def build_models(self, resuming: bool):
            self.watched = super().build_models(resuming)
            self.teacher_before = _tensors(self.watched.pair.teacher)
            return self.watched

    trainer = TeacherWatchingTrainer(load_run_config(recipe, overrides))
    try:
        history = trainer.train()
        after = _tensors(trainer.watched.pair.teacher)
    finally:
        trainer.close()
    unchanged = all(torch.equal(after[k], v) for k, v in trainer.teacher_before.items())
    return {"history": history, "teacher_unchanged": unchanged}


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)
    }


def logged(results: list[dict]) -> list[dict]:
    histories = [r["history"] for r in results if r["history"]]
    assert len(histories) == 1, "exactly one rank logs"
    assert all(r["teacher_unchanged"] for r in results)
    return histories[0]


def read_student(directory: str) -> dict[str, torch.Tensor]:
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    description = ModelDescription.from_dict(STUDENT)
    model = build_gpt_model(description, transformer_config(description))
    load_model_weights(model, directory)
    weights = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }
    destroy_parallel()
    return weights


def resume_without_optimizer_state(recipe: str, overrides: list[str]) -> dict:
    """The student's weights at build time, right after the resume, and after one step."""
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().clone() for k, v in module.named_parameters()}

    class WatchingTrainer(DistillationTrainer):
        def build_models(self, resuming: bool):
            models = super().build_models(resuming)
            self.built = weights(models.student.module)
            return models

    trainer = WatchingTrainer(load_run_config(recipe, overrides))
    try:
        resumed = weights(trainer.models.student.module)
        trainer.train()
        stepped = weights(trainer.models.student.module)
    finally:
        trainer.close()
    return {"built": trainer.built, "resumed": resumed, "stepped": stepped}


def assert_resume_kept_the_loaded_weights(ranks: list[dict], lr: float) -> None:
    """What ``resume_without_optimizer_state`` reported: one step moved no weight by more
    than Adam's first step can (about lr), away from the checkpoint's weights, which must be
    far from those the model was built with (else the check could not fail)."""
    for rank in ranks:
        for key, resumed in rank["resumed"].items():
            moved = (rank["stepped"][key] - resumed).abs().max().item()
            assert moved <= 1.5 * lr, (key, moved)
        farthest = max(
            (rank["built"][k] - v).abs().max().item() for k, v in rank["resumed"].items()
        )
        assert farthest > 3 * lr, "the built weights must be far from the trained ones"
