"""Distil a frozen teacher into a student with Megatron-Core.

    torchrun --nproc-per-node N -m hpd_megatron.train --config recipes/NAME.yaml [key=value ...]

The recipe (YAML) maps onto ``RunConfig``; ``dotted.key=value`` arguments override it.
The run itself is ``training/trainer.py``'s ``DistillationTrainer``. Exit codes: 0 when
done, 1 on bad input (one line naming the file or key), 75 after a stop signal's save.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hpd_megatron.cli import run_cli
from hpd_megatron.parallel.initialize import use_one_cuda_connection
from hpd_megatron.training.config import RunConfig, load_run_config
from hpd_megatron.training.trainer import DistillationTrainer


def train(run: RunConfig) -> list[dict[str, float]]:
    """Run ``run`` on this rank; returns the per-step metrics on the logging rank."""
    trainer = DistillationTrainer(run)
    try:
        return trainer.train()
    finally:
        trainer.close()  # on success, a stop, or an error alike


def main(argv: Sequence[str] | None = None) -> None:
    use_one_cuda_connection()  # first: the CUDA context must see it when it is created
    parser = argparse.ArgumentParser(description="HPD distillation on Megatron-Core")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)

    def run() -> None:
        train(load_run_config(args.config, args.overrides))

    run_cli(run)


if __name__ == "__main__":
    main()
