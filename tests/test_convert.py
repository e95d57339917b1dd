"""Hugging Face <-> Megatron-Core conversion, checked against transformers itself.

Tiny random models of every family (Llama 2, Llama 3.1 with llama3 RoPE scaling,
Llama 3.2 with tied embeddings, Mistral in bf16, Qwen2 with QKV bias, tied embeddings and
more embedding rows than tokenizer tokens, Qwen3 with qk-norm and head_dim != hidden/heads)
are built by transformers from configs and saved as safetensors (one of them sharded).
Each is converted once at TP1; the distributed checkpoint is layout-free, so the same
output is loaded at TP1 PP1, TP2 PP1, TP1 PP2 and TP2 PP2 and its logits compared with
transformers' on 96 positions (three times the llama3 scaling's original context). The
way back must reproduce every tensor bit for bit. The command-line tools are run once
each under several processes (streamed writers, --verify), and each bad input must give
one line and leave nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.multiprocess import run_on_ranks
from tests.tool_runs import load_tool, run_main

SEQ, BATCH, GREEDY = 96, 2, 4
# TP and PP together; TP-only and PP-only loading of the same GPTModels is covered by
# tests/test_layout_equivalence.py (each layout here costs a multi-process launch).
LAYOUTS = [(1, 1), (2, 2)]
TOKENIZER_TOKENS = 300  # qwen2's tokenizer; its config has 400 embedding rows
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
COMMON = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=128,
)
MODELS = {
    "llama2": ("LlamaConfig", dict(COMMON, num_key_value_heads=4, rope_theta=10000.0)),
    "llama31": ("LlamaConfig", dict(COMMON, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama32": (
        "LlamaConfig",
        dict(COMMON, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    ),
    "mistral": ("MistralConfig", dict(COMMON, rope_theta=1000000.0, sliding_window=None)),
    "qwen2": (
        "Qwen2Config",
        dict(COMMON, vocab_size=400, rope_theta=1000000.0, tie_word_embeddings=True),
    ),
    "qwen3": ("Qwen3Config", dict(COMMON, intermediate_size=96, head_dim=24, rope_theta=1000000.0)),
}
SHARDED = "llama31"  # saved in several files with an index
BF16 = "mistral"  # saved (and so converted) in bf16


def _write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer whose words cover the verification prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hpd_megatron.convert.verify import PROMPTS

    words = ["<unk>", "<eos>"]
    for text in PROMPTS:
        for word in re.findall(r"\w+|[^\w\s]+", text):
            if word not in words:
                words.append(word)
    words += [f"w{i}" for i in range(TOKENIZER_TOKENS - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<eos>",
                "unk_token": "<unk>",
            }
        )
    )


def _make_hf_model(name: str, directory: Path) -> None:
    import transformers

    config_class, kwargs = MODELS[name]
    torch.manual_seed(sorted(MODELS).index(name))
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_class)(**kwargs)
    )
    with torch.no_grad():
        # Far from the default init (norms at 1, std 0.02), so that any mapping mistake,
        # swapped norms included, moves the logits by much more than the tolerance.
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif parameter_name.endswith("bias"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.15 * torch.randn_like(parameter))
    if name == BF16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(
        directory, safe_serialization=True, max_shard_size="150KB" if name == SHARDED else "1GB"
    )
    if name == "qwen2":
        _write_tokenizer(directory)


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, TOKENIZER_TOKENS, (BATCH, SEQ), generator=generator)


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ---- bodies run on gloo ranks --------------------------------------------------------


def _convert_all(hf_root: str, out_root: str) -> dict:
    from hpd_megatron.convert.hf_to_megatron import convert
    from hpd_megatron.convert.launch import conversion_processes

    stats = {}
    with conversion_processes(1, 1):
        for name in MODELS:
            stats[name] = convert(Path(hf_root) / name, Path(out_root) / name, progress=False)
    return stats


def _checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def _key_mismatches(model: torch.nn.Module, directory: Path) -> list[tuple]:
    """Keys and global shapes this layout's GPTModel asks for that the checkpoint in
    ``directory`` does not have (every rank's)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = _checkpoint_shapes(directory)
    mismatches = []
    for item in model.sharded_state_dict().values():
        if isinstance(item, ShardedTensor) and not item.allow_shape_mismatch:
            if stored.get(item.key) != tuple(item.global_shape):
                mismatches.append((item.key, stored.get(item.key), item.global_shape))
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, mismatches)
    return [m for ranks in every_rank for m in ranks]


def _verify_all(tp: int, pp: int, hf_root: str, meg_root: str, export_root: str | None) -> dict:
    """Every model at this layout: the verify report, plus what the layout's model expects."""
    from hpd_megatron.checkpoint.weights import load_model_weights, save_model_weights
    from hpd_megatron.convert.launch import conversion_processes
    from hpd_megatron.convert.verify import verify
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription

    results = {}
    with conversion_processes(tp, pp):
        for name in MODELS:
            meg = Path(meg_root) / name
            description = ModelDescription.from_yaml(meg / "model.yaml")
            report = verify(
                Path(hf_root) / name,
                meg,
                description,
                tokens=_tokens(),
                greedy_steps=GREEDY,
                keep_logits=(tp, pp) == (1, 1),
            )
            model = build_gpt_model(description, transformer_config(description))
            report["key_mismatches"] = _key_mismatches(model, meg)
            if export_root is not None:
                # What the trainer's export writes: this layout's padded vocab, model.yaml, hf/.
                load_model_weights(model, meg)
                target = Path(export_root) / name
                save_model_weights(model, target)
                if torch.distributed.get_rank() == 0:
                    shutil.copy(meg / "model.yaml", target / "model.yaml")
                    shutil.copytree(meg / "hf", target / "hf")
                torch.distributed.barrier()
            if name == "llama31" and (tp, pp) == (1, 1):
                # The same weights without the scaling: proves the test can see it.
                plain = ModelDescription.from_dict(dict(description.to_dict(), rope_scaling=None))
                report["unscaled"] = verify(
                    Path(hf_root) / name, meg, plain, tokens=_tokens(), greedy_steps=0
                )["max_abs_logit_diff"]
            results[name] = report
    return results


def _reverse_all(jobs: list[tuple[str, str, str | None]]) -> None:
    from hpd_megatron.convert.launch import conversion_processes
    from hpd_megatron.convert.megatron_to_hf import convert

    with conversion_processes(1, 1):
        for ckpt, out, model_yaml in jobs:
            convert(ckpt, out, model_yaml=model_yaml, progress=False)


def _cli(tool: str, argv: list[str]) -> int:
    return load_tool(tool).main(argv)


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    hf_root, meg_root, export_root, back_root = (root / d for d in ("hf", "meg", "export", "back"))
    for name in MODELS:
        _make_hf_model(name, hf_root / name)
    meg_root.mkdir()
    stats = run_on_ranks(_convert_all, 1, str(hf_root), str(meg_root))[0]
    layouts = {}
    for tp, pp in LAYOUTS:
        export = str(export_root) if (tp, pp) == (2, 2) else None
        reports = run_on_ranks(
            _verify_all, tp * pp, tp, pp, str(hf_root), str(meg_root), export, timeout=400
        )
        layouts[(tp, pp)] = reports[0]
    # Back to HF: from the TP1 conversion (with hf/), from the TP2 PP2 export (padded
    # vocab), and without hf/ (config.json synthesised from model.yaml).
    synthesised = root / "no_hf"
    jobs = []
    for name in MODELS:
        jobs.append((str(meg_root / name), str(back_root / "direct" / name), None))
        jobs.append((str(export_root / name), str(back_root / "export" / name), None))
        shutil.copytree(meg_root / name, synthesised / name, ignore=shutil.ignore_patterns("hf"))
        jobs.append((str(synthesised / name), str(back_root / "synthesised" / name), None))
    run_on_ranks(_reverse_all, 1, jobs)
    return {
        "root": root,
        "hf": hf_root,
        "meg": meg_root,
        "back": back_root,
        "stats": stats,
        "layouts": layouts,
    }


# ---- logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers(work, name, tp, pp):
    report = work["layouts"][(tp, pp)][name]
    assert report["layout"] == {"tp": tp, "pp": pp}
    assert report["prompts"] == [BATCH, SEQ]
    assert report["max_abs_logit"] > 1.0, (
        "logits are degenerate; the comparison would prove nothing"
    )
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0
    assert report["mean_kl"] < 1e-8
    assert report["greedy_identical"], (report["greedy_hf"], report["greedy_megatron"])
    assert len(report["greedy_hf"][0]) == GREEDY
    assert report["passed"]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_checkpoint_keys_and_shapes_are_what_gptmodel_asks_for(work, tp, pp):
    for name, report in work["layouts"][(tp, pp)].items():
        assert report["key_mismatches"] == [], name


def test_llama3_rope_scaling_matters_beyond_original_context(work):
    report = work["layouts"][(1, 1)]["llama31"]
    hf, megatron = report["logits"]["hf"], report["logits"]["megatron"]
    original = LLAMA3_ROPE["original_max_position_embeddings"]
    assert SEQ >= 3 * original
    torch.testing.assert_close(megatron[:, original:], hf[:, original:], atol=1e-4, rtol=0)
    # Without the scaling the same weights are far off: the match above is not luck.
    assert report["unscaled"] > 1e-2


def test_description_follows_config(work):
    from hpd_megatron.models.description import ModelDescription

    qwen2 = ModelDescription.from_yaml(work["meg"] / "qwen2" / "model.yaml")
    assert qwen2.vocab_size == TOKENIZER_TOKENS  # the tokenizer's, not the config's 400 rows
    assert qwen2.extra["hf_vocab_size"] == 400
    assert (qwen2.qkv_bias, qwen2.tie_word_embeddings, qwen2.rotary_base) == (True, True, 1e6)
    qwen3 = ModelDescription.from_yaml(work["meg"] / "qwen3" / "model.yaml")
    assert (qwen3.qk_layernorm, qwen3.kv_channels, qwen3.num_query_groups) == (True, 24, 2)
    llama31 = ModelDescription.from_yaml(work["meg"] / "llama31" / "model.yaml")
    assert llama31.rope_scaling.original_max_position_embeddings == 32
    assert llama31.rope_scaling.factor == 8.0
    assert (work["meg"] / "qwen2" / "hf" / "tokenizer.json").is_file()
    assert work["stats"][BF16]["dtype"] == "bfloat16"
    assert work["stats"]["llama2"]["dtype"] == "float32"


# ---- the way back --------------------------------------------------------------------


@pytest.mark.parametrize("source", ["direct", "export", "synthesised"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_bit_exact(work, name, source):
    original = _read_safetensors(work["hf"] / name)
    back = _read_safetensors(work["back"] / source / name)
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), (
            f"{key} differs after HF -> Megatron -> HF ({source})"
        )


@pytest.mark.parametrize("source", ["direct", "synthesised"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_keeps_architecture(work, name, source):
    from transformers import AutoConfig

    from hpd_megatron.convert.hf_config import ARCHITECTURE_FIELDS

    original = AutoConfig.from_pretrained(work["hf"] / name)
    back = AutoConfig.from_pretrained(work["back"] / source / name)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(back, field, None) == getattr(original, field, None), field
    assert back.rope_parameters == original.rope_parameters
    if name == "qwen2":
        assert (work["back"] / source / name / "generation_config.json").is_file()
        if source == "direct":
            assert (work["back"] / source / name / "tokenizer.json").read_bytes() == (
                work["hf"] / name / "tokenizer.json"
            ).read_bytes()


# ---- the command-line tools under several processes ----------------------------------


def test_cli_hf_to_megatron_tp2_pp2_streams_and_verifies(work):
    """Four processes, each writing only its TP x PP position; --verify at TP2 PP2."""
    out = work["root"] / "cli_tp2pp2"
    codes = run_on_ranks(
        _cli,
        4,
        "convert_hf_to_megatron",
        [
            "--hf-dir",
            str(work["hf"] / "qwen2"),
            "--out",
            str(out),
            "--tp",
            "2",
            "--pp",
            "2",
            "--verify",
            "--no-progress",
        ],
        timeout=400,
    )
    assert codes == [0, 0, 0, 0]
    report = json.loads((out / "verify.json").read_text())
    assert report["layout"] == {"tp": 2, "pp": 2} and report["passed"]
    assert report["max_abs_logit_diff"] <= 1e-4 and report["greedy_identical"]
    # Written piecewise by four processes, the checkpoint equals the one-process one.
    assert _checkpoint_shapes(out) == _checkpoint_shapes(work["meg"] / "qwen2")
    assert not out.with_name(out.name + ".partial").exists()


def test_cli_megatron_to_hf_two_processes_sharded_output(work):
    out = work["root"] / "cli_back"
    codes = run_on_ranks(
        _cli,
        2,
        "convert_megatron_to_hf",
        [
            "--ckpt",
            str(work["meg"] / "qwen3"),
            "--out",
            str(out),
            "--shard-size",
            "100KB",
            "--tp",
            "2",
            "--verify",
            "--no-progress",
        ],
        timeout=400,
    )
    assert codes == [0, 0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((out / f).is_file() for f in files)
    original = _read_safetensors(work["hf"] / "qwen3")
    assert sorted(index["weight_map"]) == sorted(original)
    back = _read_safetensors(out)
    assert all(torch.equal(back[k], v) for k, v in original.items())
    report = json.loads((out / "verify.json").read_text())
    assert report["direction"] == "megatron_to_hf" and report["passed"]
    assert report["layout"] == {"tp": 2, "pp": 1} and report["max_abs_logit_diff"] <= 1e-4


# ---- bad input -----------------------------------------------------------------------


def _fails(tool: str, argv: list[str], out: Path, *fragments: str) -> str:
    code, err = run_main(load_tool(tool).main, argv + ["--no-progress"])
    err = err.strip()
    assert code == 1
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return err


def _copy(work, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"{name}_copy"
    shutil.copytree(work["hf"] / name, target)
    return target


def test_error_unsupported_architecture(work, tmp_path):
    source = _copy(work, "llama2", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _fails(
        "convert_hf_to_megatron",
        ["--hf-dir", str(source), "--out", str(out)],
        out,
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    )


def test_error_missing_shard(work, tmp_path):
    source = _copy(work, SHARDED, tmp_path)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    out = tmp_path / "out"
    _fails(
        "convert_hf_to_megatron",
        ["--hf-dir", str(source), "--out", str(out)],
        out,
        shards[1].name,
        "model.safetensors.index.json",
    )


def test_error_tp_does_not_divide_kv_heads(work, tmp_path):
    out = tmp_path / "out"
    _fails(
        "convert_hf_to_megatron",
        ["--hf-dir", str(work["hf"] / "qwen3"), "--out", str(out), "--tp", "4"],
        out,
        "TP=4 does not divide num_query_groups (KV heads)=2",
    )


def test_error_shape_disagrees_with_config(work, tmp_path):
    source = _copy(work, "llama2", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 128
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    err = _fails(
        "convert_hf_to_megatron",
        ["--hf-dir", str(source), "--out", str(out)],
        out,
        "tensor model.layers.0.mlp.",
        "config.json",
    )
    # Both shapes, the file's (160 wide) and the one config.json implies (128).
    assert re.search(
        r"has shape \[(160, 64|64, 160)\] but .* implies \[(128, 64|64, 128)\]", err
    ), err


def test_error_pickle_weights_only(work, tmp_path):
    source = tmp_path / "bin_only"
    source.mkdir()
    shutil.copy(work["hf"] / "llama2" / "config.json", source / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, source / "pytorch_model.bin")
    out = tmp_path / "out"
    _fails(
        "convert_hf_to_megatron",
        ["--hf-dir", str(source), "--out", str(out)],
        out,
        "pytorch_model.bin",
        "safetensors are required",
        "save_pretrained",
    )


def test_error_reverse_without_model_description(work, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work["meg"] / "llama2", ckpt, ignore=shutil.ignore_patterns("model.yaml"))
    out = tmp_path / "out"
    _fails(
        "convert_megatron_to_hf",
        ["--ckpt", str(ckpt), "--out", str(out)],
        out,
        "model.yaml",
        "--model",
    )


def test_error_output_exists(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_main(
        load_tool("convert_hf_to_megatron").main,
        ["--hf-dir", str(work["hf"] / "llama2"), "--out", str(out), "--no-progress"],
    )
    assert code == 1 and "already exists" in err
    assert list(out.iterdir()) == []


# ---- mapping rules in isolation --------------------------------------------------------


def test_qkv_layout_is_grouped_per_kv_group():
    from hpd_megatron.convert.mapping import interleave_qkv, split_qkv
    from hpd_megatron.models.description import ModelDescription

    d = ModelDescription(
        family="llama",
        num_layers=1,
        hidden_size=8,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=8,
        vocab_size=8,
        kv_channels=3,
    )
    q = torch.arange(12.0).unsqueeze(1) + 100  # 4 heads x 3 rows
    k = torch.arange(6.0).unsqueeze(1) + 200  # 2 groups x 3 rows
    v = torch.arange(6.0).unsqueeze(1) + 300
    qkv = interleave_qkv(q, k, v, groups=2).squeeze(1).tolist()
    assert qkv == [
        100,
        101,
        102,
        103,
        104,
        105,
        200,
        201,
        202,
        300,
        301,
        302,
        106,
        107,
        108,
        109,
        110,
        111,
        203,
        204,
        205,
        303,
        304,
        305,
    ]
    for back, original in zip(split_qkv(interleave_qkv(q, k, v, 2), d), (q, k, v)):
        assert torch.equal(back, original)


def test_norm_names_for_local_and_transformer_engine_specs():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from hpd_megatron.convert.mapping import layer_entries, module_parameter_name
    from hpd_megatron.models.description import ModelDescription

    d = ModelDescription(
        family="qwen3",
        num_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        ffn_hidden_size=32,
        vocab_size=64,
    )
    keys_map = get_gpt_layer_local_spec(
        qk_layernorm=True, normalization="RMSNorm"
    ).submodules.sharded_state_dict_keys_map
    names = {e.hf_names[0]: e for e in layer_entries(d, 3)}
    pre_attention = names["model.layers.3.input_layernorm.weight"]
    pre_mlp = names["model.layers.3.post_attention_layernorm.weight"]
    assert (
        module_parameter_name(pre_attention, "local") == "decoder.layers.3.input_layernorm.weight"
    )
    assert (
        module_parameter_name(pre_attention, "te")
        == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    )
    assert module_parameter_name(pre_mlp, "local") == "decoder.layers.3.pre_mlp_layernorm.weight"
    assert (
        module_parameter_name(pre_mlp, "te") == "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    )
    # The local spec stores its norms under the TE names, i.e. our checkpoint keys.
    for entry in layer_entries(d, 3):
        local = module_parameter_name(entry, "local")[len("decoder.layers.3.") :]
        for prefix, replacement in keys_map.items():
            if local.startswith(prefix):
                local = replacement + local[len(prefix) :]
        assert f"decoder.layers.{local}" == entry.key
