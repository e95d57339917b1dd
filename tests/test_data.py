"""Off-policy data: tokenizers, chat masks, prepare -> indexed datasets -> samples, bad input.

Every tokenizer is built here (SentencePiece trained on the arithmetic task, Hugging Face ones
with the `tokenizers` library); nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy
import pytest
import torch

from hpd_megatron.data import (
    DataError,
    DistillationDataset,
    encode_conversation,
    encode_prompt,
    load_tokenizer,
    prepare,
    resolve_chat_template,
    train_sentencepiece,
)
from hpd_megatron.data.arithmetic import extract_answer, generate, solve, write_task
from hpd_megatron.data.chat import builtin_text
from hpd_megatron.data.records import conversation
from hpd_megatron.errors import ConfigError
from tests.tool_runs import load_tool, run_main

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def indexed(prefix: str, suffix: str) -> list[numpy.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix + suffix)
    # Copies: the arrays view a memory map that closes with the dataset.
    return [numpy.array(dataset[i]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def task() -> list[dict]:
    train, _ = generate(num_train=60, num_test=0, seed=3)
    return train


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, task) -> Path:
    texts = [builtin_text(conversation(r)) for r in task] + ["System: be brief\n"]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "arith", vocab_size=60)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer with hand-picked ids, so expected ids can be written down."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
        "<pad>": 3,
        "User": 4,
        ":": 5,
        "Assistant": 6,
        "hi": 7,
        "yo": 8,
        ".": 9,
        "System": 10,
        "ok": 11,
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path_factory.mktemp("word")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE (lossless) with ChatML special tokens and template, like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(
        ["system user assistant", "Compute 12 + 34. The answer is 46."] * 5, trainer
    )
    directory = tmp_path_factory.mktemp("chatml")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
        )
    )
    return directory


# --- tokenizers and chat formats ---------------------------------------------------------


def test_sentencepiece_is_lossless_with_its_special_ids(sp_model, task):
    tokenizer = load_tokenizer(sp_model)
    assert (tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        "sentencepiece",
        1,
        2,
        3,
    )
    assert tokenizer.vocab_size == 60
    for record in task[:10]:
        text = record["prompt"] + "\n" + record["response"]
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # digits are single pieces (split_digits)
    assert [tokenizer.piece(i) for i in tokenizer.encode("347")] == ["3", "4", "7"]


def test_builtin_format_ids_and_mask_by_hand(word_tokenizer):
    tokenizer = load_tokenizer(word_tokenizer)
    assert (tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        "huggingface",
        1,
        2,
        3,
    )
    messages = [
        {"role": "system", "content": "ok"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo ."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    template = resolve_chat_template(tokenizer, "auto")
    assert template is None  # no chat_template in its config: builtin
    ids, mask = encode_conversation(tokenizer, messages, template)
    # <s> System : ok User : hi Assistant : | yo . </s> | User : hi Assistant : | ok </s>
    assert ids == [1, 10, 5, 11, 4, 5, 7, 6, 5, 8, 9, 2, 4, 5, 7, 6, 5, 11, 2]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    # The prompt for the second reply is exactly what precedes it in the conversation.
    assert encode_prompt(tokenizer, messages[:4], template) == ids[:17]


def test_fingerprint_tells_vocabularies_apart(word_tokenizer, sp_model, tmp_path):
    same_vocab = tmp_path / "copy"
    same_vocab.mkdir()
    # The same vocabulary saved with different formatting has the same fingerprint.
    (same_vocab / "tokenizer.json").write_text(
        json.dumps(json.loads(word_tokenizer.read_text()), indent=4)
    )
    assert load_tokenizer(same_vocab).fingerprint() == load_tokenizer(word_tokenizer).fingerprint()
    assert load_tokenizer(sp_model).fingerprint() != load_tokenizer(word_tokenizer).fingerprint()


def test_chat_template_masks_only_assistant_turns(chatml_tokenizer):
    tokenizer = load_tokenizer(chatml_tokenizer)  # a directory: finds tokenizer.json
    assert tokenizer.eos_id == tokenizer._tok.token_to_id("<|im_end|>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 12 + 34."},
        {"role": "assistant", "content": "The answer is 46."},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "46."},
    ]
    template = resolve_chat_template(tokenizer, "auto")
    ids, mask = encode_conversation(tokenizer, messages, template)
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert tokenizer.decode(ids) == rendered
    replies, current = [], []
    for token, bit in zip(ids + [None], mask + [0]):
        if bit:
            current.append(token)
        elif current:
            replies.append(tokenizer.decode(current))
            current = []
    assert replies == ["The answer is 46.<|im_end|>\n", "46.<|im_end|>\n"]
    prompt = encode_prompt(tokenizer, messages[:2], template)
    assert tokenizer.decode(prompt).endswith(
        "<|im_start|>user\nCompute 12 + 34.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == ids[: mask.index(1)]


def test_template_rendering_matches_transformers(chatml_tokenizer):
    from transformers import PreTrainedTokenizerFast

    from hpd_megatron.data.chat import _render

    reference = PreTrainedTokenizerFast(tokenizer_file=str(chatml_tokenizer / "tokenizer.json"))
    messages = [
        {"role": "user", "content": "a {{ b }} <c>"},
        {"role": "assistant", "content": "  d\n"},
    ]
    for generation_prompt in (False, True):
        expected = reference.apply_chat_template(
            messages, chat_template=CHATML, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert _render(CHATML, messages, generation_prompt, {}) == expected


# --- prepare -> indexed datasets -> samples ----------------------------------------------


def test_prepare_round_trip_sentencepiece(tmp_path, sp_model, task):
    data = write_jsonl(tmp_path / "train.jsonl", task)
    logged = []
    sidecar = prepare(data, sp_model, tmp_path / "out" / "train", seq_length=256, log=logged.append)
    prefix = str(tmp_path / "out" / "train")
    tokens, masks = indexed(prefix, "_tokens"), indexed(prefix, "_loss_mask")
    tokenizer = load_tokenizer(sp_model)
    assert len(tokens) == len(task) == sidecar["records"]
    for record, ids, mask in zip(task, tokens, masks):
        ids, mask = ids.tolist(), mask.tolist()
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert (
            tokenizer.decode(ids[1:-1])
            == f"User: {record['prompt']}\nAssistant:\n{record['response']}"
        )
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(ids) - start)  # one reply, at the end, EOS included
        assert tokenizer.decode(ids[start:-1]) == record["response"]
    assert sidecar["tokens"] == sum(len(t) for t in tokens)
    assert sidecar["response_tokens"] == sum(int(m.sum()) for m in masks)
    assert (sidecar["truncated"], sidecar["dropped"], sidecar["chat_template"]) == (0, 0, "builtin")
    assert sidecar["tokenizer"] == {**tokenizer.describe()}
    assert sidecar["tokenizer"]["vocab_size"] == 60
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == sidecar
    assert f"{len(task)} records" in logged[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train.json",
        "train_loss_mask.bin",
        "train_loss_mask.idx",
        "train_tokens.bin",
        "train_tokens.idx",
    ]


def test_prepare_chat_records_with_template(tmp_path, chatml_tokenizer):
    messages = [
        {"role": "user", "content": "Compute 1 + 2."},
        {"role": "assistant", "content": "3."},
    ]
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": messages}, {"prompt": "Compute 1 + 2.", "response": "3."}],
    )
    sidecar = prepare(data, chatml_tokenizer, tmp_path / "chat", seq_length=64, log=lambda _: None)
    assert sidecar["chat_template"] == "tokenizer"
    tokenizer = load_tokenizer(chatml_tokenizer)
    tokens, masks = (
        indexed(str(tmp_path / "chat"), "_tokens"),
        indexed(str(tmp_path / "chat"), "_loss_mask"),
    )
    # Both schemas give the same conversation, hence the same ids.
    assert tokens[0].tolist() == tokens[1].tolist()
    reply = tokens[0][masks[0] == 1]
    assert tokenizer.decode(reply) == "3.<|im_end|>\n"


def test_padding_samples_shift_labels(tmp_path, word_tokenizer):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "hi", "response": "yo ."}, {"prompt": "hi hi", "response": "ok"}],
    )
    prepare(data, word_tokenizer, tmp_path / "d", seq_length=10, log=lambda _: None)
    dataset = DistillationDataset(tmp_path / "d", seq_length=10)
    assert len(dataset) == 2
    # record 0: <s> User : hi Assistant : yo . </s>  (ids 1 4 5 7 6 5 8 9 2), reply = yo . </s>
    sample = dataset[0]
    assert sample["tokens"].tolist() == [1, 4, 5, 7, 6, 5, 8, 9, 3, 3]
    assert sample["labels"].tolist() == [-100, -100, -100, -100, -100, 8, 9, 2, -100, -100]
    assert sample["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert sample["position_ids"].tolist() == list(range(8)) + [0, 1]
    batch = dataset.batch([1, 0])
    assert batch["tokens"].shape == batch["labels"].shape == (2, 10)
    assert batch["labels"][0].tolist() == [-100] * 6 + [11, 2, -100, -100]
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64


def test_packing_keeps_records_apart(tmp_path, word_tokenizer):
    records = [
        {"prompt": "hi", "response": "yo ."},
        {"prompt": "hi hi", "response": "ok"},
        {"prompt": "hi", "response": "ok ok ok"},
    ]
    sidecar = prepare(
        write_jsonl(tmp_path / "d.jsonl", records),
        word_tokenizer,
        tmp_path / "d",
        seq_length=20,
        log=lambda _: None,
    )
    dataset = DistillationDataset(tmp_path / "d", seq_length=20, pack=True)
    # Positions per record: 8, 8, 9 -> best-fit decreasing in 20: [9 + 8] [8]; the tie
    # between records 0 and 1 goes to the lower id.
    assert len(dataset) == 2
    first = dataset[0]
    assert (
        first["tokens"].tolist() == [1, 4, 5, 7, 6, 5, 11, 11, 11, 1, 4, 5, 7, 6, 5, 8, 9] + [3] * 3
    )
    assert (
        first["labels"].tolist()
        == ([-100] * 5 + [11, 11, 11, 2]) + ([-100] * 5 + [8, 9, 2]) + [-100] * 3
    )
    assert first["position_ids"].tolist() == list(range(9)) + list(range(8)) + list(range(3))
    assert first["segment_ids"].tolist() == [0] * 9 + [1] * 8 + [2] * 3
    second = dataset[1]
    assert second["labels"].tolist() == [-100] * 6 + [11, 2] + [-100] * 12
    assert second["segment_ids"].tolist() == [0] * 8 + [1] * 12
    # Real tokens over slots: 25 positions in 2 x 20 packed, in 3 x 20 padded.
    assert dataset.efficiency == 25 / 40
    assert "efficiency 62.5% (real tokens / slots)" in dataset.describe()
    assert sidecar["packing"] == {
        "seq_length": 20,
        "packed_samples": 2,
        "packed_efficiency": 0.625,
        "padded_samples": 3,
        "padded_efficiency": 0.4167,
    }
    # Packing and padding supervise exactly the same tokens; padded samples stay as before.
    padded = DistillationDataset(tmp_path / "d", seq_length=20)
    assert "segment_ids" not in padded[0]

    def labels(ds: DistillationDataset) -> list[int]:
        return sorted(int(t) for i in range(len(ds)) for t in ds[i]["labels"] if t != -100)

    assert labels(dataset) == labels(padded) == [2, 2, 2, 8, 9, 11, 11, 11, 11]


def _fills(samples: list[list[int]], sizes: numpy.ndarray, capacity: int) -> None:
    """Every record exactly once, no sample over capacity."""
    assert sorted(r for sample in samples for r in sample) == list(range(len(sizes)))
    assert max(int(sizes[sample].sum()) for sample in samples) <= capacity


def test_best_fit_packs_where_next_fit_wastes():
    from hpd_megatron.data.packing import best_fit_decreasing, efficiency, next_fit

    # Records of 10-60% of a sample, in random order: next-fit closes a sample as soon as
    # the next record does not fit, leaving on average a fifth of it empty.
    capacity = 1024
    sizes = numpy.random.default_rng(0).integers(100, 620, 4000)
    best, nxt = best_fit_decreasing(sizes, capacity, seed=1), next_fit(sizes, capacity)
    _fills(best, sizes, capacity)
    _fills(nxt, sizes, capacity)
    packed, baseline = efficiency(sizes, len(best), capacity), efficiency(sizes, len(nxt), capacity)
    print(f"best-fit decreasing {packed:.2%}, next-fit {baseline:.2%}")
    assert packed >= 0.95
    assert baseline < 0.85


def test_packing_depends_on_the_seed_and_the_data_only():
    from hpd_megatron.data.packing import best_fit_decreasing

    sizes = numpy.random.default_rng(3).integers(1, 300, 2500)
    # Windows of 1000 records: the last one is partial, and records never cross windows.
    first = best_fit_decreasing(sizes, 512, seed=5, window=1000)
    assert first == best_fit_decreasing(sizes.copy(), 512, seed=5, window=1000)
    _fills(first, sizes, 512)
    other = best_fit_decreasing(sizes, 512, seed=6, window=1000)
    _fills(other, sizes, 512)
    assert other != first, "the seed shuffles which records share a sample"
    order = numpy.random.default_rng(5).permutation(len(sizes))
    window = {int(r): i // 1000 for i, r in enumerate(order)}
    assert all(len({window[r] for r in sample}) == 1 for sample in first)


def test_overlong_truncate_and_drop(tmp_path, word_tokenizer):
    # lengths 9, 10 and 14 tokens; seq_length 9 admits 10
    records = [
        {"prompt": "hi", "response": "yo ."},
        {"prompt": "hi hi", "response": "ok ok"},
        {"prompt": "hi hi hi hi hi hi hi", "response": "ok"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    logged = []
    kept = prepare(
        data, word_tokenizer, tmp_path / "t", seq_length=9, overlong="truncate", log=logged.append
    )
    # The third record's prompt alone fills 10 tokens: no reply left, so it is dropped.
    assert (kept["records"], kept["truncated"], kept["dropped"]) == (2, 0, 1)
    assert "dropped 1 records" in logged[1] and "lines 3" in logged[1]
    records[1] = {"prompt": "hi hi", "response": "ok ok ok ok"}  # 12 tokens: truncated to 10
    write_jsonl(tmp_path / "d.jsonl", records)
    kept = prepare(
        data, word_tokenizer, tmp_path / "t", seq_length=9, overlong="truncate", log=logged.append
    )
    assert (kept["records"], kept["truncated"], kept["dropped"]) == (2, 1, 1)
    assert indexed(str(tmp_path / "t"), "_tokens")[1].tolist() == [1, 4, 5, 7, 7, 6, 5, 11, 11, 11]
    assert indexed(str(tmp_path / "t"), "_loss_mask")[1].tolist() == [0] * 7 + [1] * 3
    dropped = prepare(
        data, word_tokenizer, tmp_path / "x", seq_length=9, overlong="drop", log=lambda _: None
    )
    assert (dropped["records"], dropped["truncated"], dropped["dropped"]) == (1, 0, 2)
    # Training at a shorter length than prepared is refused.
    with pytest.raises(
        DataError, match=r"record 1 has 10 tokens, more than data.seq_length \+ 1 = 9"
    ):
        DistillationDataset(tmp_path / "t", seq_length=8)


# --- bad input: one error naming the file and line, and nothing written ------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "hi", "response": ', r"d.jsonl:2: not valid JSON"),
        ('{"prompt": "hi"}', r'd.jsonl:2: record has a "prompt" but no "response"'),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            r"d.jsonl:2: record has no assistant message",
        ),
        (
            '{"text": "hi"}',
            r'd.jsonl:2: expected \{"prompt", "response"\} or \{"messages"\}, '
            r"got keys \['text'\]",
        ),
        ('["hi"]', r"d.jsonl:2: expected a JSON object, got list"),
        (
            '{"messages": [{"role": "bot", "content": "hi"}]}',
            r"d.jsonl:2: messages\[0\]: role 'bot' is not one of",
        ),
        ('{"prompt": "hi", "response": 3}', r'd.jsonl:2: "response" must be a string, got int'),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, word_tokenizer, line, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "yo"}, line])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(data, word_tokenizer, out / "d", seq_length=16, log=lambda _: None)
    assert list(out.iterdir()) == []  # not even the staging directory is left


def test_bad_files_and_settings(tmp_path, word_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "yo"}])
    out = str(tmp_path / "out" / "d")
    quiet = dict(log=lambda _: None)
    with pytest.raises(DataError, match=r"nothere.jsonl: no such data file"):
        prepare(tmp_path / "nothere.jsonl", word_tokenizer, out, 16, **quiet)
    with pytest.raises(DataError, match=r"nothere.model: no such tokenizer file"):
        prepare(data, tmp_path / "nothere.model", out, 16, **quiet)
    with pytest.raises(DataError, match=r"e.jsonl: no records \(the file is empty\)"):
        prepare(write_jsonl(tmp_path / "e.jsonl", ["", "  "]), word_tokenizer, out, 16, **quiet)
    with pytest.raises(DataError, match=r"d.jsonl: no records left: all 1 were dropped"):
        prepare(data, word_tokenizer, out, 4, overlong="drop", **quiet)
    with pytest.raises(ConfigError, match=r"overlong: expected one of truncate, drop"):
        prepare(data, word_tokenizer, out, 16, overlong="cut", **quiet)
    with pytest.raises(DataError, match=r"t.jinja: no such chat template file"):
        prepare(data, word_tokenizer, out, 16, chat_template=str(tmp_path / "t.jinja"), **quiet)
    # A template that rewrites earlier turns cannot be masked; the record's line is named.
    (tmp_path / "last.jinja").write_text("{{ messages[-1]['content'] }}")
    with pytest.raises(DataError, match=r"d.jsonl:1: message 1: the chat template renders"):
        prepare(data, word_tokenizer, out, 16, chat_template=str(tmp_path / "last.jinja"), **quiet)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(
        DataError, match=r"broken.jinja: the chat template is not valid Jinja \(template line 1"
    ):
        prepare(
            data, word_tokenizer, out, 16, chat_template=str(tmp_path / "broken.jinja"), **quiet
        )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    with pytest.raises(DataError, match=r"out/d.json: no such file"):
        DistillationDataset(out, 16)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_failure_keeps_earlier_outputs(tmp_path, word_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "hi", "response": "yo"}])
    prepare(good, word_tokenizer, tmp_path / "d", 16, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("d")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "ok"}, "{"])
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare(bad, word_tokenizer, tmp_path / "d", 16, log=lambda _: None)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(("d", ".d"))}
    assert after == before


def test_prepare_tool_reports_one_line(tmp_path, word_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": 1'])
    argv = ["--input", str(data), "--tokenizer", str(word_tokenizer)]
    argv += ["--output-prefix", str(tmp_path / "d"), "--seq-length", "8"]
    code, err = run_main(load_tool("prepare_data").main, argv)
    assert code == 1
    assert err.strip() == f"error: {data}:1: not valid JSON (Expecting ',' delimiter at column 13)"


# --- the arithmetic task -------------------------------------------------------------------


def test_arithmetic_by_hand():
    assert solve(347, "+", 589) == (
        "7 + 9 = 16, write 6 carry 1.\n4 + 8 + 1 = 13, write 3 carry 1.\n3 + 5 + 1 = 9, write 9.\n"
        "The answer is 936."
    )
    assert solve(605, "-", 278) == (
        "5 - 8 < 0, borrow: 15 - 8 = 7, write 7.\n0 - 7 - 1 < 0, borrow: 10 - 7 - 1 = 2, write 2.\n"
        "6 - 2 - 1 = 3, write 3.\nThe answer is 327."
    )
    assert (
        solve(58, "*", 7)
        == "8 * 7 = 56, write 6 carry 5.\n5 * 7 + 5 = 40, write 0 carry 4.\nWrite the carry 4.\n"
        "The answer is 406."
    )
    assert extract_answer("... The answer is 12.\nThe answer is 406.") == 406
    assert extract_answer("The answer is") is None


def test_arithmetic_steps_and_answers_are_right():
    train, test = generate(num_train=400, num_test=100, seed=7, max_digits=4)
    ops = set()
    for record in train + test:
        a, op, b = re.fullmatch(r"Compute (\d+) ([-+*]) (\d+)\.", record["prompt"]).groups()
        a, b = int(a), int(b)
        ops.add(op)
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert record["answer"] == extract_answer(record["response"]) == expected
        for left, right in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", record["response"]):
            assert eval(left) == int(right), (record, left)  # every written step is true
        written = re.findall(r"(?:write|Write the carry) (\d)", record["response"])
        assert int("".join(reversed(written))) == expected  # the written digits spell the answer
    assert ops == {"+", "-", "*"}


def test_arithmetic_is_deterministic_and_splits_are_disjoint(tmp_path):
    train, test = generate(num_train=300, num_test=50, seed=11)
    assert (train, test) == generate(num_train=300, num_test=50, seed=11)
    assert generate(num_train=300, num_test=50, seed=12)[1] != test
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 350  # no repeats, hence train and test disjoint
    assert (
        generate(num_train=10, num_test=50, seed=11)[1] == test
    )  # the test split ignores the train size
    with pytest.raises(ConfigError, match=r"found only \d+ distinct problems with max_digits=1"):
        generate(num_train=1000, num_test=0, seed=0, max_digits=1)
    additions, _ = generate(
        num_train=200, num_test=0, seed=11, min_digits=2, max_digits=2, ops=("+",)
    )
    for record in additions:  # the demo's task: two two-digit numbers added
        a, b = map(int, re.fullmatch(r"Compute (\d+) \+ (\d+)\.", record["prompt"]).groups())
        assert 10 <= a <= 99 and 10 <= b <= 99 and record["answer"] == a + b
    with pytest.raises(ConfigError, match=r"ops: expected some of \+ - \*, got /"):
        generate(num_train=1, num_test=0, seed=0, ops=("/",))
    with pytest.raises(ConfigError, match="min_digits <= max_digits"):
        generate(num_train=1, num_test=0, seed=0, min_digits=3, max_digits=2)
    paths = write_task(tmp_path / "task", 30, 5, seed=11, tokenizer_vocab_size=60)
    assert [p.name for p in paths] == ["train.jsonl", "test.jsonl", "tokenizer.model"]
    written = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert written == generate(30, 5, seed=11)[0]
    tokenizer = load_tokenizer(paths[2])
    text = builtin_text(conversation(written[0]))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == [
        "test.jsonl",
        "tokenizer.model",
        "train.jsonl",
    ]
