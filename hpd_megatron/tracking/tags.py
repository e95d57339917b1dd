"""Facts about this launch that may change between resumes: MLflow tags, not params.

Params are immutable in MLflow and describe the recipe; the Slurm job, restart count,
hosts, code version and container describe one launch, and a resumed job overwrites them.
Nothing here may fail: a fact that cannot be found is left out.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Where a container runtime leaves the image's name, most specific first: our own sbatch
# templates, Slurm's --container-image (and Pyxis's SPANK option), Apptainer/Singularity.
CONTAINER_IMAGE_VARIABLES = (
    "CONTAINER_IMAGE",
    "SLURM_CONTAINER_IMAGE",
    "SLURM_SPANK__SLURM_SPANK_OPTION_pyxis_container_image",
    "APPTAINER_CONTAINER",
    "SINGULARITY_CONTAINER",
)

SLURM_VARIABLES = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.restart_count": "SLURM_RESTART_COUNT",
    "slurm.job_nodelist": "SLURM_JOB_NODELIST",
    "slurm.job_name": "SLURM_JOB_NAME",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
}

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_tags() -> dict[str, str]:
    """Slurm job, host, git commit, container image and library versions, as found."""
    tags: dict[str, str] = {}
    for tag, variable in SLURM_VARIABLES.items():
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    tags["host"] = socket.gethostname()
    for variable in CONTAINER_IMAGE_VARIABLES:
        if os.environ.get(variable):
            tags["container.image"] = os.environ[variable]
            break
    if os.environ.get("NVIDIA_PYTORCH_VERSION"):  # NGC PyTorch containers' release, e.g. 25.01
        tags["container.nvidia_pytorch_version"] = os.environ["NVIDIA_PYTORCH_VERSION"]
    commit = _git(["rev-parse", "HEAD"])
    if commit:
        tags["git.commit"] = commit
        # The commit alone does not say what ran if the working tree had local edits.
        status = _git(["status", "--porcelain", "--untracked-files=no"])
        if status is not None:
            tags["git.dirty"] = "true" if status else "false"
    tags["version.python"] = platform.python_version()
    for tag, distribution, module in (
        ("version.torch", "torch", "torch"),
        ("version.megatron_core", "megatron-core", "megatron.core"),
        ("version.mlflow", "mlflow", "mlflow"),
    ):
        version = _version(distribution, module)
        if version:
            tags[tag] = version
    return tags


def _git(arguments: list[str]) -> str | None:
    """``git <arguments>`` in the project's checkout; None if git or the checkout is missing."""
    try:
        result = subprocess.run(
            ["git", *arguments], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _version(distribution: str, module: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        # Some containers build torch or Megatron from source without installing metadata;
        # ask the module only if it is already imported (never import torch just for this).
        return getattr(sys.modules.get(module), "__version__", None)
