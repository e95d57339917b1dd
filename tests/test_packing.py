"""Packed samples: every record sees only itself, in both models, at every layout.

A packed micro-batch of three records (and one padding position) goes through the student
and teacher pair; each record then goes through alone. Logits of both models must agree
record by record, and so must the student's gradients of a per-position distillation loss
(the packed loss is the sum of the records' losses). Changing one record's tokens must not
change a single bit of the others' logits. Then a packed training run stops in the middle
of an epoch and resumes exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_on_ranks
from tests.training_runs import SEQ as TRAIN_SEQ
from tests.training_runs import STUDENT, TEACHER, logged, train_on_rank

RECORDS = (5, 7, 3)  # positions of the packed records
SEQ = 16  # one padding position after them
VOCAB = STUDENT["vocab_size"]


def _segments() -> torch.Tensor:
    ids = [k for k, size in enumerate(RECORDS) for _ in range(size)]
    return torch.tensor([ids + [len(RECORDS)] * (SEQ - len(ids))])


def _positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in every segment, as the dataset writes them."""
    row = segments[0].tolist()
    return torch.tensor([[row[:i].count(s) for i, s in enumerate(row)]])


def _pair(student, teacher):
    from hpd_megatron.models.builder import build_gpt_model, layer_spec, transformer_config
    from hpd_megatron.training.pair import DistillationPair

    models = [
        build_gpt_model(d, transformer_config(d), spec=layer_spec(d, False, packed=True))
        for d in (student, teacher)
    ]
    return DistillationPair(*models, student.hidden_size, teacher.hidden_size)


def _forward(pair, batch: dict, length: int, forward_only: bool) -> dict | None:
    """Student and teacher logits (full vocabulary) on the last stage; the student's
    per-position KL from the teacher, summed, backpropagated unless ``forward_only``."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from hpd_megatron.training.schedule import run_schedule

    def forward_step(stage, micro_batch):
        student_out, teacher_out = stage(micro_batch)

        def loss_func(output):
            student = gather_from_tensor_model_parallel_region(output)[..., :VOCAB].float()
            teacher = gather_from_tensor_model_parallel_region(teacher_out)[..., :VOCAB].float()
            target = torch.log_softmax(teacher, dim=-1)
            kl = (target.exp() * (target - torch.log_softmax(student, dim=-1))).sum(-1)
            loss = (kl * micro_batch["loss_mask"]).sum()
            return loss, {"student": student.detach().clone(), "teacher": teacher.detach().clone()}

        return student_out, loss_func

    reports = run_schedule(
        pair,
        [batch],
        forward_step,
        seq_length=length,
        micro_batch_size=1,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=pair.adjust_tensor_shapes,
    )
    return reports[0] if reports else None


def _student_grads(pair) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in pair.student.named_parameters()}
    for parameter in pair.student.parameters():
        parameter.grad = None
    return grads


def _packed_against_alone(tp: int, pp: int) -> dict:
    from megatron.core import parallel_state

    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    student, teacher = (ModelDescription.from_dict(kw) for kw in (STUDENT, TEACHER))
    models = [("student", student), ("teacher", teacher)]
    initialize_parallel(ParallelLayout(tp, pp), seed=11, models=models)
    pair = _pair(student, teacher)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    segments = _segments()
    mask = (segments < len(RECORDS)).float()  # padding is not supervised
    packed = {
        "tokens": tokens,
        "position_ids": _positions(segments),
        "segment_ids": segments,
        "loss_mask": mask,
    }
    out = {"packed": _forward(pair, packed, SEQ, forward_only=False)}
    out["packed_grads"] = _student_grads(pair)
    # Another first record (and padding): the other records must not see it.
    other = tokens.clone()
    other[:, : RECORDS[0]] = torch.randint(0, VOCAB, (1, RECORDS[0]), generator=generator)
    other[:, sum(RECORDS) :] = 0
    out["perturbed"] = _forward(pair, {**packed, "tokens": other}, SEQ, forward_only=True)
    out["alone"] = []
    start = 0
    for size in RECORDS:
        alone = {
            "tokens": tokens[:, start : start + size],
            "position_ids": torch.arange(size).unsqueeze(0),
            "loss_mask": mask[:, start : start + size],
        }
        out["alone"].append(_forward(pair, alone, size, forward_only=False))
        start += size
    out["alone_grads"] = _student_grads(pair)
    last = parallel_state.is_pipeline_last_stage()
    if not (last and parallel_state.get_tensor_model_parallel_rank() == 0):
        out.update(packed=None, perturbed=None, alone=None)
    destroy_parallel()
    return out


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["tp1pp1", "tp2pp2"])
def layout(request) -> list[dict]:
    tp, pp = request.param
    return run_on_ranks(_packed_against_alone, tp * pp, tp, pp)


def _reporting(ranks: list[dict]) -> dict:
    filled = [r for r in ranks if r["packed"] is not None]
    assert len(filled) == 1
    return filled[0]


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_packed_logits_equal_each_record_alone(layout, model):
    rank = _reporting(layout)
    packed = rank["packed"][model][0]
    assert packed.shape == (SEQ, VOCAB)
    start = 0
    for size, alone in zip(RECORDS, rank["alone"]):
        # RoPE angles run on across the packed sample; only their differences matter, so
        # the records agree to fp32 rounding.
        torch.testing.assert_close(packed[start : start + size], alone[model][0], atol=2e-5, rtol=0)
        start += size


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_no_position_attends_outside_its_record(layout, model):
    rank = _reporting(layout)
    first = RECORDS[0]
    packed, perturbed = rank["packed"][model][0], rank["perturbed"][model][0]
    assert not torch.equal(packed[:first], perturbed[:first]), "the perturbation must show"
    # Masked keys get exactly zero weight: the other records' logits are bit-identical.
    assert torch.equal(packed[first : sum(RECORDS)], perturbed[first : sum(RECORDS)])


def test_student_gradients_equal_the_records_alone(layout):
    for rank in layout:
        packed, alone = rank["packed_grads"], rank["alone_grads"]
        assert packed.keys() == alone.keys() and len(packed) > 5
        # At TP2 the second rank's vocabulary rows are all padding: no gradient there.
        empty = {n for n, g in alone.items() if not g.abs().max() > 0}
        assert empty <= {"embedding.word_embeddings.weight", "output_layer.weight"}, empty
        for name, grad in alone.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(
                packed[name], grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name
            )


def test_block_causal_mask_by_hand():
    from hpd_megatron.training.schedule import block_causal_mask

    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    allowed = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert (~mask[0, 0]).int().tolist() == allowed


def test_thd_cu_seqlens_by_hand():
    from hpd_megatron.errors import ConfigError
    from hpd_megatron.training.schedule import thd_packed_seq_params

    params = thd_packed_seq_params(_segments())
    assert params.qkv_format == "thd"
    for cu in (params.cu_seqlens_q, params.cu_seqlens_kv, params.cu_seqlens_q_padded):
        assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 12, 15, 16]
    assert params.max_seqlen_q == params.max_seqlen_kv == 7
    with pytest.raises(ConfigError, match="schedule.micro_batch_size: .* got 2"):
        thd_packed_seq_params(_segments().expand(2, -1))


def test_packed_run_resumes_exactly_mid_epoch(setup, prepared_data):
    from hpd_megatron.data import DistillationDataset
    from hpd_megatron.data.packing import next_fit

    dataset = DistillationDataset(prepared_data, TRAIN_SEQ, pack=True, seed=7)
    batch = 4  # the recipe's global batch: the stop after step 3 falls inside an epoch
    assert 0 < 3 * batch % len(dataset) < len(dataset) - batch
    assert len(dataset) < len(next_fit(dataset.positions, TRAIN_SEQ)), "best-fit packs tighter"
    root = setup["root"]
    run = ["data.pack=true", "schedule.train_steps=6", "checkpoint.save_interval=3"]
    straight = logged(
        run_on_ranks(train_on_rank, 1, setup["recipe"], run + [f"run_dir={root / 'pk_straight'}"])
    )
    resumed_run = run + [f"run_dir={root / 'pk_resumed'}"]
    first = logged(
        run_on_ranks(train_on_rank, 1, setup["recipe"], resumed_run + ["schedule.exit_interval=3"])
    )
    second = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], resumed_run))
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    for expected, got in zip(straight, first + second):
        for key in ("loss", "grad_norm", "supervised_tokens", "hpd/sample_differs"):
            assert got[key] == expected[key], (got["step"], key, got[key], expected[key])
