"""Off-policy data: tokenizers, chat formatting with reply masks, indexed datasets, the sampler.

``prepare`` (tools/prepare_data.py) turns JSONL into Megatron indexed datasets of tokens and
loss masks; ``DistillationDataset`` reads them back as fixed-length samples with shifted
labels; ``DistributedBatchSampler`` decides which samples each data-parallel rank sees.
"""

from hpd_megatron.data.chat import encode_conversation, encode_prompt, resolve_chat_template
from hpd_megatron.data.dataset import DistillationDataset
from hpd_megatron.data.prepare import prepare
from hpd_megatron.data.records import read_records
from hpd_megatron.data.sampler import DistributedBatchSampler
from hpd_megatron.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from hpd_megatron.errors import DataError

__all__ = [
    "DataError",
    "DistillationDataset",
    "DistributedBatchSampler",
    "Tokenizer",
    "encode_conversation",
    "encode_prompt",
    "load_tokenizer",
    "prepare",
    "read_records",
    "resolve_chat_template",
    "train_sentencepiece",
]
