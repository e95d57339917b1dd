"""``python -m hpd_megatron.plan``: the planner's command line (cli.py)."""

from hpd_megatron.cli import run_cli
from hpd_megatron.plan.cli import main

if __name__ == "__main__":
    run_cli(main)
