"""``python -m hpd_megatron.study``: see ``experiment.py``."""

from hpd_megatron.cli import run_cli
from hpd_megatron.study.experiment import main

run_cli(main)
