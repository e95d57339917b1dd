"""Next-token sampling against the softmax, and generation at TP2 x PP2 against TP1 x PP1.

Sampling: many draws from fixed logits (with padded columns that must never be drawn) at
TP1 in this process and at TP2 over gloo; the frequencies must pass a chi-square test
against softmax(z / T) restricted to the top-p nucleus and renormalised, and must fail it
against the distribution without temperature (so the test can tell).

Generation (one run of 4 gloo ranks, as torchrun would start them): a tiny model is
exported at TP1 x PP1 with the arithmetic task's tokenizer beside it and loaded at TP2 x PP2
through dist_checkpointing. ``generate``: greedy and sampled tokens must be identical at
both layouts, batched generation must equal one prompt at a time, and EOS and the context
limit must stop rows where expected. The commands: ``hpd_megatron.evaluate`` at TP2 x PP2
and at DP4 gives the same replies and skips the prompt longer than the context, and
``tools/generate_data.py`` (PP2 x DP2) writes records that prepare_data reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hpd_megatron.data.arithmetic import write_task
from hpd_megatron.data.records import read_records
from hpd_megatron.eval.answers import avg_at_k
from tests.multiprocess import free_port, run_on_ranks
from tests.tool_runs import load_tool
from tests.training_runs import STUDENT

WIDTH = 16  # padded columns per TP rank at TP2 (32 at TP1)
SHARP = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 0.2, -0.5, 1.5, 0.7]  # 10 real tokens: TP rank 1 holds none
DRAWS = 20_000
CASES = [  # (logits name, temperature, top_p)
    ("sharp", 1.0, 1.0),
    ("sharp", 0.7, 0.9),
    ("sharp", 1.5, 0.5),
    # Nearly flat, the high logits on TP rank 1: the nucleus needs more than the first 64
    # candidates per rank, and at TP2 more than rank 1 alone holds.
    ("flat", 1.0, 0.95),
    ("flat", 1.0, 0.5),
]


def _logits(name: str) -> tuple[torch.Tensor, int]:
    """[padded width] logits (padding columns high, to be noticed if drawn) and the real vocab."""
    if name == "sharp":
        real = torch.tensor(SHARP)
        padded = torch.cat([real, torch.full((2 * WIDTH - len(SHARP),), 10.0)])
        return padded, len(SHARP)
    real = torch.linspace(0.0, 0.5, 200)  # nearly flat over 200 tokens
    return torch.cat([real, torch.full((56,), 10.0)]), 200


def _expected(name: str, temperature: float, top_p: float) -> torch.Tensor:
    padded, vocab = _logits(name)
    probs = torch.softmax(padded[:vocab].double() / temperature, dim=0)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]  # mass strictly above each token
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[order[before < top_p]] = True
    nucleus = torch.where(keep, probs, 0.0)
    return nucleus / nucleus.sum()


def _draw(rank: int, size: int, group) -> dict:
    from hpd_megatron.eval.sampling import next_tokens

    out = {}
    for case in CASES:
        name, temperature, top_p = case
        padded, vocab = _logits(name)
        width = padded.numel() // size
        shard = padded[rank * width : (rank + 1) * width].expand(DRAWS, -1).clone()
        ids, entropy = next_tokens(shard, vocab, temperature, top_p, seed=11, tp_group=group)
        greedy, _ = next_tokens(shard[:2], vocab, tp_group=group)
        out[case] = (ids, entropy[0].item(), greedy)
    return out


def _draw_tp2() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return _draw(dist.get_rank(), 2, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _chi_square(ids: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    support = probs > 0
    expected = probs[support] * ids.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum())


def _critical(df: int) -> float:
    # Far in the tail (about p < 1e-5 for these df): a correct sampler never gets here.
    return df + 6 * math.sqrt(2 * df) + 10


@pytest.fixture(scope="module")
def draws() -> dict:
    return {1: _draw(0, 1, None), 2: run_on_ranks(_draw_tp2, 2)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[1]}-p{c[2]}")
@pytest.mark.parametrize("tp", [1, 2])
def test_sampling_matches_softmax(draws, tp, case):
    name, temperature, top_p = case
    per_rank = [draws[1]] if tp == 1 else draws[2]
    ids, entropy, greedy = per_rank[0][case]
    for other in per_rank[1:]:
        assert torch.equal(other[case][0], ids), "TP ranks disagree on the sampled tokens"
    probs = _expected(name, temperature, top_p)
    assert int(ids.min()) >= 0 and int(ids.max()) < probs.numel(), "a padded column was drawn"
    outside = probs[ids] == 0
    assert not outside.any(), f"{int(outside.sum())} draws outside the top-p nucleus"
    support = int((probs > 0).sum())
    assert _chi_square(ids, probs) < _critical(support - 1)
    # The same draws against softmax(z) without temperature or top-p must fail, else the
    # test could not see a sampler that ignores them.
    if (temperature, top_p) != (1.0, 1.0):
        wrong = _expected(name, 1.0, 1.0)
        assert _chi_square(ids, wrong) > _critical(int((wrong > 0).sum()) - 1)

    padded, vocab = _logits(name)
    reference = torch.distributions.Categorical(
        logits=padded[:vocab].double() / temperature
    ).entropy()
    assert entropy == pytest.approx(reference.item(), abs=1e-6)
    assert greedy.tolist() == [int(padded[:vocab].argmax())] * 2


def test_tp2_draws_equal_tp1_draws(draws):
    # The inverse-CDF sampler is layout-independent up to rounding at bucket edges.
    for case in CASES:
        same = (draws[1][case][0] == draws[2][0][case][0]).double().mean().item()
        assert same > 0.999, f"{case}: only {same:.4f} of the draws agree between TP1 and TP2"


# Random123's known-answer vectors for philox4x32-10 (kat_vectors): (counter, key, output).
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB],
    ),
]


def _words_to_uniform(words: list[int]) -> float:
    return ((words[0] >> 5) * 2**26 + (words[1] >> 6)) / 2**53


def test_counter_uniforms_are_philox4x32_10():
    from hpd_megatron.eval.sampling import counter_uniforms, seed_keys

    mask = 2**32 - 1

    def philox(counter: list[int], key: list[int]) -> list[int]:  # Python ints: no overflow
        c0, c1, c2, c3 = counter
        k0, k1 = key
        for round_ in range(10):
            if round_:
                k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
            p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
            c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        return [c0, c1, c2, c3]

    for counter, key, words in PHILOX_KAT:
        assert philox(counter, key)[:2] == words
    seeds, positions = [0, 1, 2**56 - 1, 2**64 - 1, 987654321], [0, 1, 7, 2**32 + 3]
    u = counter_uniforms(seed_keys(seeds, torch.device("cpu")), torch.tensor(positions))
    for r, seed in enumerate(seeds):
        for c, t in enumerate(positions):
            words = philox([t & mask, t >> 32, 0, 0], [seed & mask, seed >> 32])
            assert u[r, c].item() == _words_to_uniform(words)


def test_counter_uniforms_are_uniform_and_per_row():
    from hpd_megatron.eval.sampling import counter_uniforms, seed_keys

    cpu = torch.device("cpu")
    seeds = list(range(1000, 1400))
    u = counter_uniforms(seed_keys(seeds, cpu), torch.arange(250))  # 100k draws
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Mean 1/2 and variance 1/12, each within about 4.5 standard errors of 100k draws.
    assert abs(u.mean().item() - 0.5) < 0.004
    assert abs(u.var().item() - 1 / 12) < 0.0012
    assert torch.histc(u, bins=10, min=0, max=1).sub(10_000).abs().max() < 450
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.015
    # A row's draws are its own: any subset, order or window of rows and positions.
    picked = [seeds[i] for i in (399, 3, 250)]
    assert torch.equal(
        counter_uniforms(seed_keys(picked, cpu), torch.arange(100, 250)),
        u[[399, 3, 250], 100:],
    )


# --- generation with a model ---------------------------------------------------------------

MODEL = dict(STUDENT, max_position_embeddings=64, init_method_std=0.1)
TEST_PROBLEMS = 5
LONG_LINE = TEST_PROBLEMS + 1  # the prompt longer than the context


def write_eval_task(root: Path) -> Path:
    """The arithmetic task with its tokenizer, an evaluation file (one prompt too long for the
    context, one in the messages schema) and a model.yaml-only directory, under ``root``."""
    write_task(
        root / "data",
        num_train=64,
        num_test=TEST_PROBLEMS,
        seed=0,
        max_digits=2,
        tokenizer_vocab_size=MODEL["vocab_size"],
    )
    lines = (root / "data" / "test.jsonl").read_text().splitlines()
    lines.append(json.dumps({"prompt": "Compute " + "9" * 80 + " + 1.", "answer": 10**80}))
    lines.append(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Compute 2 + 2."},
                    {"role": "assistant", "content": "The answer is 4."},
                ]
            }
        )
    )
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (root / "described").mkdir()
    (root / "described" / "model.yaml").write_text(yaml.safe_dump(MODEL))
    return root


PROMPTS = [
    [5, 17, 99, 3],
    [120, 2],
    [7, 7, 7, 7, 7, 7, 7, 9, 110],
    [64, 1, 33],
    [88, 40, 12, 60, 2],
]
NEW_TOKENS = 8
CONTEXT = 10  # for the context-limit case: leaves 1 to 8 tokens of room
SAMPLING = [
    "--samples",
    "2",
    "--temperature",
    "0.8",
    "--top-p",
    "0.9",
    "--max-new-tokens",
    "6",
    "--batch-size",
    "4",
    "--seed",
    "3",
]


ROW_SEEDS = [2**56 - 1, 0, 12345, 2**40 + 7, 99]


def _run(model, prompts, settings, eos_id=None, context_length=64, row_seeds=None):
    from hpd_megatron.eval.generate import generate

    return generate(
        model,
        prompts,
        settings,
        vocab_size=MODEL["vocab_size"],
        eos_id=eos_id,
        context_length=context_length,
        seed=5,
        row_seeds=row_seeds,
    )


def _generate_on_layouts(root: str, ports: list[int]) -> dict:
    """4 ranks: TP1 x PP1 (each rank a DP replica), then TP2 x PP2 from the same weights,
    then the commands (each starts and ends its own process group, on a fresh port)."""
    from megatron.core import parallel_state

    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.eval.generate import SamplingSettings
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    description = ModelDescription.from_dict(MODEL)
    greedy = SamplingSettings(max_new_tokens=NEW_TOKENS)
    sampled = SamplingSettings(temperature=0.9, top_p=0.8, max_new_tokens=NEW_TOKENS)
    out = _generate_at_tp1(Path(root), description, greedy, sampled)

    # At TP2 the padded vocabulary is 256: TP rank 1 holds no real token.
    initialize_parallel(ParallelLayout(2, 2), seed=99, models=[("model", description)])
    model = build_gpt_model(description, transformer_config(description)).eval()
    load_model_weights(model, Path(root) / "export")
    out["greedy_22"] = _run(model, PROMPTS, greedy)
    out["sampled_22"] = _run(model, PROMPTS, sampled)
    out["rows_22"] = _run(model, PROMPTS, sampled, row_seeds=ROW_SEEDS)
    parallel_state.destroy_model_parallel()
    _run_commands(Path(root), ports)
    return out


def _generate_at_tp1(root_path: Path, description, greedy, sampled) -> dict:
    """A fresh model at TP1 x PP1, exported (with the tokenizer) for the other layouts and
    the commands, and its generations."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hpd_megatron.checkpoint.weights import export_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    out = {}
    initialize_parallel(ParallelLayout(1, 1), seed=3, models=[("model", description)])
    model = build_gpt_model(description, transformer_config(description)).eval()
    export_model_weights(model, root_path / "export", description=description)
    if dist.get_rank() == 0:
        shutil.copy(root_path / "data" / "tokenizer.model", root_path / "export")
    out["greedy_11"] = _run(model, PROMPTS, greedy)
    out["sampled_11"] = _run(model, PROMPTS, sampled)
    out["one_at_a_time"] = [_run(model, [prompt], greedy)[0] for prompt in PROMPTS]
    # The reference without a KV cache: one full causal forward over prompt + reply.
    out["full_forward_argmax"] = []
    for prompt, generation in zip(PROMPTS, out["greedy_11"]):
        sequence = torch.tensor([list(prompt) + generation.tokens])
        with torch.no_grad():
            logits = model(
                input_ids=sequence,
                position_ids=torch.arange(sequence.shape[1])[None],
                attention_mask=None,
            )
        predicted = logits[0, len(prompt) - 1 : -1, : MODEL["vocab_size"]].argmax(-1)
        out["full_forward_argmax"].append(predicted.tolist())
    out["eos_id"] = eos_id = out["greedy_11"][0].tokens[2]
    out["with_eos"] = _run(model, PROMPTS, greedy, eos_id=eos_id)
    out["context"] = _run(model, PROMPTS, greedy, context_length=CONTEXT)
    out.update(_generate_with_row_seeds(model, sampled))
    parallel_state.destroy_model_parallel()
    return out


def _generate_with_row_seeds(model, sampled) -> dict:
    """Sampled with per-row seeds: the batch, each prompt alone and the batch reversed, with
    an EOS that stops some rows early (they stay in the batch until the host looks)."""
    out = {"rows_11": _run(model, PROMPTS, sampled, row_seeds=ROW_SEEDS)}
    replies = _tokens(out["rows_11"])
    # Row 0's first token that some other reply lacks: rows end both ways.
    out["rows_eos_id"] = eos_id = next(
        token for token in replies[0] if any(token not in reply for reply in replies[1:])
    )
    out["rows_eos"] = _run(model, PROMPTS, sampled, eos_id=eos_id, row_seeds=ROW_SEEDS)
    out["rows_alone"] = [
        _run(model, [prompt], sampled, eos_id=eos_id, row_seeds=[row_seed])[0]
        for prompt, row_seed in zip(PROMPTS, ROW_SEEDS)
    ]
    out["rows_reversed"] = _run(
        model, PROMPTS[::-1], sampled, eos_id=eos_id, row_seeds=ROW_SEEDS[::-1]
    )[::-1]
    return out


def _run_commands(root_path: Path, ports: list[int]) -> None:
    """``hpd_megatron.evaluate`` at TP2 x PP2 and at DP4, then tools/generate_data.py."""
    from hpd_megatron.evaluate import main as evaluate

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    common = ["--ckpt", str(root_path / "export"), "--data", str(root_path / "eval.jsonl")]
    common += SAMPLING
    # No store: no tracking.
    evaluate([*common, "--tp", "2", "--pp", "2", "--out", str(root_path / "tp2pp2")])
    os.environ["MASTER_PORT"] = str(ports[0])  # the last run tore the process group down
    evaluate([*common, "--out", str(root_path / "dp4"), "--no-tracking"])
    os.environ["MASTER_PORT"] = str(ports[1])
    teacher = ["--pp", "2", "--keep-unfinished", "--out", str(root_path / "teacher.jsonl")]
    assert load_tool("generate_data").main([*common, *teacher]) == 0


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_eval_task(tmp_path_factory.mktemp("generation"))


@pytest.fixture(scope="module")
def generated(task) -> list[dict]:
    return run_on_ranks(_generate_on_layouts, 4, str(task), [free_port(), free_port()])


def _tokens(generations) -> list[list[int]]:
    return [g.tokens for g in generations]


def test_greedy_tp2_pp2_equals_tp1_pp1(generated):
    reference = _tokens(generated[0]["greedy_11"])
    assert all(len(t) == NEW_TOKENS for t in reference)
    assert len({tuple(t) for t in reference}) == len(PROMPTS), "prompts should continue differently"
    assert len({token for t in reference for token in t}) > 5, (
        "degenerate model: the test would prove little"
    )
    for rank, result in enumerate(generated):
        assert _tokens(result["greedy_22"]) == reference, f"rank {rank}"
        assert _tokens(result["greedy_11"]) == reference, f"rank {rank} (TP1 replica)"
        for a, b in zip(result["greedy_22"], generated[0]["greedy_11"]):
            assert a.entropies == pytest.approx(b.entropies, abs=1e-5)
            assert a.finish == b.finish == "length"


def test_sampled_tp2_pp2_equals_tp1_pp1(generated):
    reference = _tokens(generated[0]["sampled_11"])
    assert reference != _tokens(generated[0]["greedy_11"]), (
        "sampling at T=0.9 should leave the greedy path"
    )
    for result in generated:
        assert _tokens(result["sampled_22"]) == reference


def test_cached_greedy_equals_full_forward_argmax(generated):
    # Generation reuses Megatron's KV cache; a plain forward over the finished text must
    # pick the same token at every generated position.
    assert generated[0]["full_forward_argmax"] == _tokens(generated[0]["greedy_11"])


def test_batched_equals_one_prompt_at_a_time(generated):
    # Right padding without a mask: causal attention keeps the padding out of every row.
    assert _tokens(generated[0]["one_at_a_time"]) == _tokens(generated[0]["greedy_11"])


def test_rows_stop_at_eos_and_at_the_context(generated):
    result = generated[0]
    eos_id = result["eos_id"]
    for full, stopped in zip(result["greedy_11"], result["with_eos"]):
        if eos_id in full.tokens:
            end = full.tokens.index(eos_id) + 1
            assert stopped.tokens == full.tokens[:end] and stopped.finish == "eos"
        else:
            assert stopped.tokens == full.tokens and stopped.finish == "length"
    assert result["with_eos"][0].tokens[-1] == eos_id and len(result["with_eos"][0].tokens) <= 3
    for prompt, full, cut in zip(PROMPTS, result["greedy_11"], result["context"]):
        room = CONTEXT - len(prompt)  # prompt + reply fill the context...
        assert cut.tokens == full.tokens[:room]
        # ...unless max_new_tokens comes first (or at the same time).
        assert cut.finish == ("context" if room < NEW_TOKENS else "length")


def test_row_seeded_replies_depend_on_their_row_alone(generated):
    result = generated[0]
    reference = _tokens(result["rows_11"])
    assert reference != _tokens(result["sampled_11"]), "row seeds should change the draws"
    for rank, other in enumerate(generated):
        assert _tokens(other["rows_22"]) == reference, f"rank {rank}: TP2 x PP2"
    stopped = result["rows_eos"]
    assert any(g.finish == "eos" for g in stopped) and any(g.finish == "length" for g in stopped)
    for full, cut in zip(result["rows_11"], stopped):
        end = full.tokens.index(result["rows_eos_id"]) + 1 if cut.finish == "eos" else None
        assert cut.tokens == full.tokens[:end]
        # Rows leaving change the batch's shapes, so the logits' last bits may differ.
        assert cut.entropies == pytest.approx(full.entropies[:end], abs=1e-5)
    for name in ("rows_alone", "rows_reversed"):
        assert _tokens(result[name]) == _tokens(stopped), name
        assert [g.finish for g in result[name]] == [g.finish for g in stopped], name


def _read(directory: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (directory / "generations.jsonl").read_text().splitlines()]
    return rows, json.loads((directory / "summary.json").read_text())


def test_evaluate_command_outputs(task, generated):
    rows, summary = _read(task / "tp2pp2")
    assert sorted(p.name for p in (task / "tp2pp2").iterdir()) == [
        "generations.jsonl",
        "summary.json",
    ]
    kept_lines = [line for line in range(1, TEST_PROBLEMS + 3) if line != LONG_LINE]
    assert [(r["line"], r["sample"]) for r in rows] == [
        (line, s) for line in kept_lines for s in (0, 1)
    ]
    assert summary["skipped_overlong"] == 1 and summary["skipped_lines"] == [LONG_LINE]
    assert summary["records"] == TEST_PROBLEMS + 2 and summary["sequences"] == len(rows)
    assert summary["layout"].startswith("TP=2 PP=2")
    assert (
        rows[-1]["prompt"] == [{"role": "user", "content": "Compute 2 + 2."}]
        and rows[-1]["reference"] == "4"
    )
    for row in rows:
        assert 1 <= row["response_tokens"] <= 6 and row["finish"] in ("eos", "length")
        assert row["finish"] == "eos" or row["response_tokens"] == 6
    by_line: dict[int, list[bool]] = {}
    for row in rows:
        by_line.setdefault(row["line"], []).append(row["correct"])
    assert summary["avg@2"] == pytest.approx(avg_at_k(list(by_line.values())))
    assert summary["mean_response_tokens"] == pytest.approx(
        sum(r["response_tokens"] for r in rows) / len(rows)
    )
    # Token-weighted mean of the per-reply means.
    weighted = sum(r["entropy"] * r["response_tokens"] for r in rows) / sum(
        r["response_tokens"] for r in rows
    )
    assert summary["token_entropy"] == pytest.approx(weighted)
    assert 0.5 < summary["token_entropy"] < 4.86  # an untrained model: near log(128) = 4.85


def test_evaluate_command_replies_do_not_depend_on_the_layout(task, generated):
    tp2pp2, _ = _read(task / "tp2pp2")
    dp4, summary = _read(task / "dp4")
    assert summary["layout"].startswith("TP=1 PP=1 CP=1 DP=4")
    assert [r["response"] for r in dp4] == [r["response"] for r in tp2pp2]
    assert len({r["response"] for r in tp2pp2}) > 1


def test_generated_data_reads_as_training_records(task, generated):
    rows, _ = _read(task / "tp2pp2")
    records = [json.loads(line) for line in (task / "teacher.jsonl").read_text().splitlines()]
    replies = [r["response"] if "response" in r else r["messages"][-1]["content"] for r in records]
    assert replies == [row["response"] for row in rows]
    assert len(list(read_records(task / "teacher.jsonl"))) == len(records)
