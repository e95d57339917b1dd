"""On-policy rollouts (``rollout:``): the student's own replies, reproducible at any layout.

Every run goes through the real trainer; a subclass only records what ``_roll_out`` put in
each rollout row, as (step, sample index) -> the row's tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpd_megatron.errors import ConfigError
from hpd_megatron.training.rollout import is_rollout
from tests.multiprocess import run_on_ranks
from tests.training_runs import logged

ROOT = Path(__file__).resolve().parent.parent
ON_POLICY = ["rollout.fraction=1.0", "rollout.max_new_tokens=12", "loss.method=opd"]


def train_recording_rollouts(recipe: str, overrides: list[str]) -> dict:
    """Train; return the history and every rollout row this rank wrote."""
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    class RecordingTrainer(DistillationTrainer):
        rollouts_seen: dict = {}

        def _roll_out(self, step, micro_batches):
            before = [b["tokens"].clone() for b in micro_batches]
            micro_batches, metrics = super()._roll_out(step, micro_batches)
            for old, new in zip(before, micro_batches):
                for row, index in enumerate(new["sample_index"].tolist()):
                    if not bool((old[row] == new["tokens"][row]).all()):
                        self.rollouts_seen[(step, index)] = new["tokens"][row].tolist()
            return micro_batches, metrics

    trainer = RecordingTrainer(load_run_config(recipe, overrides))
    try:
        history = trainer.train()
    finally:
        trainer.close()
    return {"history": history, "rollouts": dict(trainer.rollouts_seen), "teacher_unchanged": True}


def _run(setup, name: str, ranks: int, overrides: list[str]) -> tuple[list[dict], dict]:
    run_dir = f"run_dir={setup['root'] / 'rollouts' / name}"
    results = run_on_ranks(train_recording_rollouts, ranks, setup["recipe"], overrides + [run_dir])
    rollouts: dict = {}
    for result in results:
        rollouts.update(result["rollouts"])
    return logged(results), rollouts


def test_rollout_positions_spread_the_share_over_the_batch():
    assert [p for p in range(8) if is_rollout(p, 0.25)] == [3, 7]
    assert [p for p in range(8) if is_rollout(p, 0.5)] == [1, 3, 5, 7]
    assert sum(is_rollout(p, 0.3) for p in range(10)) == 3
    assert all(is_rollout(p, 1.0) for p in range(8))
    assert not any(is_rollout(p, 0.0) for p in range(8))


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.fraction=1.5", "rollout.fraction: must be in [0, 1], got 1.5"),
        ("rollout.fraction=-0.1", "rollout.fraction: must be in [0, 1], got -0.1"),
        (
            "rollout.max_new_tokens=96",
            "rollout.max_new_tokens: 96 leaves no room for a prompt in data.seq_length 96 (a "
            "reply of N tokens needs a sample of at least N + 1 positions)",
        ),
        (
            "data.pack=true",
            "rollout.fraction: rollouts replace one record per sample; set data.pack=false",
        ),
    ],
)
def test_bad_rollout_settings_name_the_key(setup, override, message):
    from hpd_megatron.training.config import load_run_config

    overrides = ["rollout.fraction=0.5", override]
    with pytest.raises(ConfigError) as error:
        load_run_config(setup["recipe"], overrides)
    assert str(error.value) == f"{setup['recipe']}: {message}"


def test_fraction_zero_is_the_off_policy_run_bitwise(setup):
    plain, none = _run(setup, "plain", 1, [])
    zero, none_either = _run(setup, "zero", 1, ["rollout.fraction=0.0", "rollout.top_p=0.5"])
    assert none == none_either == {}
    assert [h["loss"] for h in zero] == [h["loss"] for h in plain]
    assert [h["grad_norm"] for h in zero] == [h["grad_norm"] for h in plain]


@pytest.fixture(scope="module")
def on_policy(setup) -> dict:
    """lambda = 1 at four layouts (3 steps each)."""
    layouts = {
        "TP1 PP1": (1, []),
        "TP2 PP2": (
            4,
            ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
        ),
        "DP2": (2, []),
        "micro-batch 1 lambda 0.5": (1, ["schedule.micro_batch_size=1"]),
    }
    out = {}
    for name, (ranks, extra) in layouts.items():
        overrides = ON_POLICY + extra
        if "lambda 0.5" in name:
            overrides = overrides + ["rollout.fraction=0.5"]
        out[name] = _run(setup, name.replace(" ", "_"), ranks, overrides)
    return out


def test_every_sample_rolls_out_and_the_reply_is_supervised(on_policy, setup):
    history, rollouts = on_policy["TP1 PP1"]
    assert len(rollouts) == 3 * 4  # train_steps x global_batch_size
    assert all(h["rollout/samples"] == 4 for h in history)
    assert all(0 < h["rollout/share"] < 1 for h in history)
    assert all(1 <= h["rollout/reply_tokens"] <= 12 for h in history)


@pytest.mark.parametrize("layout", ["TP2 PP2", "DP2"])
def test_rollouts_are_the_same_at_every_layout(on_policy, layout):
    reference_history, reference = on_policy["TP1 PP1"]
    history, rollouts = on_policy[layout]
    assert rollouts == reference
    for ref, got in zip(reference_history, history):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)


def test_a_half_share_rolls_out_the_same_samples_at_any_micro_batch(on_policy):
    _, everything = on_policy["TP1 PP1"]
    history, half = on_policy["micro-batch 1 lambda 0.5"]
    assert len(half) == 3 * 2 and all(h["rollout/samples"] == 2 for h in history)
    # Step 1's weights are the same in both runs: a sample's reply depends on itself only.
    step_one = {key: tokens for key, tokens in half.items() if key[0] == 1}
    assert step_one == {key: everything[key] for key in step_one}


def test_rollouts_come_from_the_current_weights(setup):
    """lr 0 keeps the step-1 weights; a large lr changes them, and with them the replies."""
    overrides = ON_POLICY + ["schedule.train_steps=3", "schedule.warmup_steps=0"]
    _, frozen = _run(setup, "frozen", 1, overrides + ["optimizer.lr=0.0"])
    _, moving = _run(setup, "moving", 1, overrides + ["optimizer.lr=0.05"])
    assert {k: v for k, v in frozen.items() if k[0] == 1} == {
        k: v for k, v in moving.items() if k[0] == 1
    }
    later = [key for key in frozen if key[0] == 3]
    assert later and any(frozen[key] != moving[key] for key in later)


def test_resume_with_rollouts_is_exact(setup):
    overrides = ON_POLICY + ["schedule.train_steps=4", "checkpoint.save_interval=2"]
    whole, whole_rollouts = _run(setup, "whole", 1, overrides)
    first, _ = _run(setup, "resumed", 1, overrides + ["schedule.exit_interval=2"])
    second, resumed_rollouts = _run(setup, "resumed", 1, overrides)
    assert [h["step"] for h in first + second] == [1, 2, 3, 4]
    assert [h["loss"] for h in first + second] == [h["loss"] for h in whole]
    assert {k: v for k, v in whole_rollouts.items() if k[0] > 2} == resumed_rollouts


def test_the_tiny_on_policy_recipe_trains(setup, tmp_path):
    """recipes/tiny_cpu_opd.yaml's loss, rollout and schedule sections, at its PP=2, with
    the test's models, weights and data (the recipe's own come from `make demo`)."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny_cpu_opd.yaml").read_text())
    assert recipe["rollout"]["fraction"] == 1.0 and recipe["loss"]["method"] == "opd"
    test_run = yaml.safe_load(Path(setup["recipe"]).read_text())
    for section in ("loss", "rollout", "optimizer", "parallel"):
        test_run[section] = recipe[section]
    test_run["schedule"] = dict(recipe["schedule"], train_steps=2, warmup_steps=1)
    test_run["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(test_run))
    history = logged(run_on_ranks(train_recording_rollouts, 2, str(path), []))
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["rollout/samples"] == recipe["schedule"]["global_batch_size"] for h in history)
