"""Evaluation: generation under TP/PP, answer extraction, avg@k.

answers.py       extract and normalise final answers, avg@k
sampling.py      next token from vocab-parallel logits: greedy, temperature, top-p, entropy
generate.py      batched generation through Megatron's pipeline schedule
prompts.py       evaluation records (JSONL), encoded with the training chat format
benchmarks.py    benchmark files (verl parquet, JSONL), the paper's protocol (k each), the table
source.py        a checkpoint's model description, tokenizer and chat format
runner.py        the shared driver of ``hpd_megatron.evaluate`` and ``tools/generate_data.py``
teacher_data.py  replies as training records
divergence.py    teacher-forced KL of student checkpoints to the teacher (the demo's study)
tracking.py      the summary into MLflow
"""
