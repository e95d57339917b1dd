"""Bad layouts, model descriptions and launch environments fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from hpd_megatron.errors import ConfigError
from hpd_megatron.models.builder import padded_vocab_size
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import initialize_parallel, read_launch_environment
from hpd_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout

LLAMA = ModelDescription(
    family="llama",
    num_layers=6,
    hidden_size=96,
    num_attention_heads=6,
    num_query_groups=3,
    ffn_hidden_size=192,
    vocab_size=1000,
)


def test_valid_layout_derives_data_parallel_size():
    layout = validate_layout(ParallelLayout(3, 2), world_size=12, models=[("student", LLAMA)])
    assert layout.data_parallel_size == 2


@pytest.mark.parametrize(
    "tp,pp,world,expected",
    [
        (4, 1, 4, "TP=4 does not divide num_attention_heads=6"),
        (2, 1, 2, "TP=2 does not divide num_query_groups (KV heads)=3"),
        (1, 4, 4, "PP=4 does not divide num_layers=6"),
        (3, 2, 8, "world size 8 is not a multiple of TP x PP x CP = 3 x 2 x 1 = 6"),
    ],
)
def test_layout_errors_name_the_values(tp, pp, world, expected):
    with pytest.raises(LayoutError) as error:
        validate_layout(ParallelLayout(tp, pp), world_size=world, models=[("teacher", LLAMA)])
    assert expected in str(error.value)


def test_explicit_data_parallel_size_must_match_world():
    with pytest.raises(LayoutError, match=r"world size 8 != TP x PP x CP x DP = 2 x 1 x 1 x 2 = 4"):
        validate_layout(ParallelLayout(2, 1, data_parallel_size=2), world_size=8)


def test_every_problem_is_reported_at_once():
    with pytest.raises(LayoutError) as error:
        validate_layout(ParallelLayout(4, 4), world_size=16, models=[("teacher", LLAMA)])
    message = str(error.value)
    assert "num_attention_heads=6" in message and "num_layers=6" in message
    assert "num_query_groups (KV heads)=3" in message


def test_bad_layout_fails_before_any_process_group_exists():
    env = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(LayoutError, match="TP=4 does not divide num_attention_heads=6"):
        initialize_parallel(ParallelLayout(4, 1), models=[("student", LLAMA)], env=env)
    assert not dist.is_initialized()


def test_launch_environment_from_torchrun_and_slurm():
    torchrun = read_launch_environment(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "node1",
            "MASTER_PORT": "6000",
        }
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank) == (3, 8, 1)
    assert (torchrun.master_addr, torchrun.master_port) == ("node1", 6000)
    slurm = read_launch_environment(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "5",
            "MASTER_ADDR": "node2",
            "MASTER_PORT": "6001",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (5, 16, 5)
    # torchrun's variables win when a torchrun runs inside an srun step.
    both = read_launch_environment(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "MASTER_ADDR": "a",
            "MASTER_PORT": "1",
        }
    )
    assert (both.rank, both.world_size) == (1, 2)
    single = read_launch_environment({})
    assert (single.rank, single.world_size) == (0, 1)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "needs MASTER_ADDR and MASTER_PORT"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            "rank 2 is outside world size 2",
        ),
        ({"RANK": "0"}, "set both RANK and WORLD_SIZE"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' is not an integer"),
    ],
)
def test_launch_environment_errors(env, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        read_launch_environment(env)


def test_model_description_defaults_by_family():
    qwen2 = ModelDescription(
        family="qwen2",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=100,
    )
    assert qwen2.qkv_bias and not qwen2.qk_layernorm
    assert qwen2.num_query_groups == 4 and qwen2.kv_channels == 16
    qwen3 = ModelDescription(
        family="qwen3",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=100,
        kv_channels=32,
    )
    assert qwen3.qk_layernorm and not qwen3.qkv_bias and qwen3.kv_channels == 32


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"family": "gpt2"},
            "model.family: unsupported family 'gpt2' (supported: llama, mistral, qwen2, qwen3)",
        ),
        ({"hiden_size": 64}, "model.hiden_size: unknown key"),
        ({"num_layers": "four"}, "model.num_layers: expected an integer, got 'four'"),
        (
            {"num_query_groups": 3},
            "model.num_query_groups: 3 does not divide num_attention_heads 4",
        ),
        ({"rope_scaling": {"type": "yarn"}}, "model.rope_scaling.type: unsupported 'yarn'"),
        ({"rope_scaling": {"factor": "big"}}, "model.rope_scaling.factor: expected a number"),
    ],
)
def test_model_description_errors_name_the_key(change, expected):
    fields = dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=100,
    )
    fields.update(change)
    with pytest.raises(ConfigError) as error:
        ModelDescription.from_dict(fields)
    assert expected in str(error.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="model.vocab_size: required key is missing"):
        ModelDescription.from_dict(
            dict(
                family="llama",
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                ffn_hidden_size=128,
            )
        )


def test_model_description_yaml_round_trip(tmp_path):
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(LLAMA.to_dict()))
    assert ModelDescription.from_yaml(path) == LLAMA
    path.write_text("family: llama\nnum_layers: [\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        ModelDescription.from_yaml(path)


@pytest.mark.parametrize(
    "vocab,tp,expected",
    [
        (1000, 1, 1024),
        (1000, 2, 1024),
        (1100, 2, 1280),
        (151665, 8, 152576),
        (128256, 8, 129024),
        (256, 2, 256),
    ],
)
def test_vocab_padding_the_megatron_way(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected


RECIPE_MODELS = Path(__file__).resolve().parent.parent / "recipes" / "models"


@pytest.mark.parametrize(
    "model,tp,pp,world,error",
    [
        ("llama3.1_70b", 8, 2, 32, None),  # DP 2
        ("llama3.1_70b", 16, 1, 32, "TP=16 does not divide num_query_groups (KV heads)=8"),
        ("llama3.1_8b", 8, 4, 32, None),
        ("qwen2.5_1.5b", 2, 2, 8, None),
        ("qwen2.5_1.5b", 4, 1, 8, "TP=4 does not divide num_query_groups (KV heads)=2"),
        ("qwen2.5_7b", 4, 8, 32, "PP=8 does not divide num_layers=28"),
    ],
)
def test_real_model_layouts(model, tp, pp, world, error):
    description = ModelDescription.from_yaml(RECIPE_MODELS / f"{model}.yaml")
    if error is None:
        layout = validate_layout(ParallelLayout(tp, pp), world, [(model, description)])
        assert layout.data_parallel_size == world // (tp * pp)
    else:
        with pytest.raises(LayoutError, match=error.replace("(", r"\(").replace(")", r"\)")):
            validate_layout(ParallelLayout(tp, pp), world, [(model, description)])


def test_real_model_vocabularies_pad_past_their_hf_output_rows():
    qwen = ModelDescription.from_yaml(RECIPE_MODELS / "qwen2.5_7b.yaml")
    llama = ModelDescription.from_yaml(RECIPE_MODELS / "llama3.1_70b.yaml")
    assert qwen.vocab_size == 151665 and padded_vocab_size(qwen.vocab_size, 4) == 152064
    assert llama.rope_scaling.factor == 8.0 and padded_vocab_size(llama.vocab_size, 8) == 129024
