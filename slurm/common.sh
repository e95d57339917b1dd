# shellcheck shell=bash
# Sourced by the sbatch templates. Only the environment lives here: the training logic is
# the same `python -m hpd_megatron.train` that torchrun and the tests run.
#
# Launcher: one task per GPU, started by srun (never torchrun under srun). Slurm then knows
# every rank: each one gets the stop signal straight from srun, accounting and cgroups see
# real processes, and the trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
#
# What a site sets (environment of the submitting shell, which sbatch passes on):
#   HPD_HOME         the project checkout (default: the directory sbatch was run from)
#   HPD_PYTHON       the interpreter (default: $HPD_HOME/.venv/bin/python; in a container
#                    that venv only if it was built there, see hpd_container_python)
#   CONTAINER_IMAGE  run every step in this image with pyxis/enroot, in one named container
#                    per job and node; CONTAINER_MOUNTS adds mounts (src:dst[,src:dst]) beside
#                    the checkout itself
#   HPD_GPU_MEM_GB   usable memory per GPU for the planner (default 80)
#   HPD_MAX_REQUEUES stop requeueing after this many restarts (default 50)
#   HPD_CPUS_PER_TASK CPUs (and OpenMP threads) per rank (default: sbatch --cpus-per-task
#                    when given, else the node's CPUs shared by its tasks)
#   HPD_EXIT_GRACE_S once one rank has exited, how long the others get before srun ends
#                    them (default 120; not --kill-on-bad-exit, which would kill ranks that
#                    are still finishing their part of a stop with exit code 75)
#   MASTER_PORT      rendezvous port (default: derived from the job id)
#   NCCL_*, CUDA_*   passed through; NCCL_SOCKET_IFNAME / NCCL_IB_HCA are the usual ones
# Account, partition, QoS, time and node count are sbatch flags or SBATCH_* variables.

# The exit code of a trainer that saved after a stop signal (hpd_megatron.checkpoint.signals).
HPD_STOP_EXIT_CODE=75

hpd_log() {
    echo "[hpd $(date +%H:%M:%S)] $*"
}

# The interpreter inside the container. The checkout is mounted at the same path, so its venv
# works there if it was built there (`make venv` inside the container: on a GPU node it uses
# --system-site-packages, keeping the image's torch, Transformer Engine and apex). A venv
# built outside (a login node's) was not, and the image's own python has no megatron-core.
hpd_container_python() {
    local venv=$HPD_HOME/.venv
    if [[ -e $venv/bin/python || -L $venv/bin/python ]] \
            && grep -qs '^include-system-site-packages = true' "$venv/pyvenv.cfg"; then
        HPD_PYTHON=$venv/bin/python
        return
    fi
    HPD_PYTHON=python
    hpd_log "warning: no venv built inside the container at $venv (build one there with" \
        "srun --container-image=... make venv, see docs/slurm.md); running the image's python," \
        "which needs megatron-core and this project installed"
}

# Exit unless $2 (the value of the variable named $1) is a non-negative integer. Bash
# arithmetic evaluates a variable's text as an expression, array subscripts and their
# $(...) included, so a value must be checked before (( )) ever sees it.
hpd_require_integer() {
    if [[ ! $2 =~ ^[0-9]+$ ]]; then
        hpd_log "error: $1 must be a non-negative integer, got '$2'"
        exit 1
    fi
}

# CPUs per rank: sbatch's --cpus-per-task when the job asked for it, otherwise the node's
# CPUs (the GPU templates take whole nodes) shared by the tasks on it, as many as the node
# has rather than a number fixed for one kind of node. srun since Slurm 22.05 does not
# inherit the batch's --cpus-per-task and would give every task one CPU: pass it explicitly.
hpd_cpus_per_task() {
    if [[ -z ${HPD_CPUS_PER_TASK:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        HPD_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    if [[ -z ${HPD_CPUS_PER_TASK:-} ]]; then
        local cpus=${SLURM_CPUS_ON_NODE:-1} tasks=${SLURM_NTASKS_PER_NODE:-}
        hpd_require_integer SLURM_CPUS_ON_NODE "$cpus"
        if [[ -z $tasks ]]; then  # --ntasks without --ntasks-per-node: spread evenly
            hpd_require_integer SLURM_NTASKS "${SLURM_NTASKS:-1}"
            hpd_require_integer SLURM_JOB_NUM_NODES "${SLURM_JOB_NUM_NODES:-1}"
            tasks=$(( ${SLURM_NTASKS:-1} / (${SLURM_JOB_NUM_NODES:-1} > 0 ? ${SLURM_JOB_NUM_NODES:-1} : 1) ))
        fi
        hpd_require_integer SLURM_NTASKS_PER_NODE "$tasks"
        HPD_CPUS_PER_TASK=$(( cpus / (tasks > 0 ? tasks : 1) ))
    fi
    hpd_require_integer HPD_CPUS_PER_TASK "$HPD_CPUS_PER_TASK"
    if (( HPD_CPUS_PER_TASK < 1 )); then
        HPD_CPUS_PER_TASK=1
    fi
}

# cd to the checkout, pick the interpreter, and export the rendezvous and GPU settings.
hpd_environment() {
    hpd_require_integer HPD_MAX_REQUEUES "${HPD_MAX_REQUEUES:-50}"
    hpd_require_integer SLURM_RESTART_COUNT "${SLURM_RESTART_COUNT:-0}"
    HPD_HOME=${HPD_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$HPD_HOME" || { hpd_log "error: HPD_HOME=$HPD_HOME: no such directory"; exit 1; }
    export HPD_HOME
    if [[ -z ${HPD_PYTHON:-} ]]; then
        if [[ -n ${CONTAINER_IMAGE:-} ]]; then
            hpd_container_python
        elif [[ -x $HPD_HOME/.venv/bin/python ]]; then
            HPD_PYTHON=$HPD_HOME/.venv/bin/python
        else
            HPD_PYTHON=python
        fi
    fi
    # Rendezvous on the first host of the allocation. The port follows the job id, so two
    # jobs that share a node do not collide, and stays the same across requeues.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    # Megatron's tensor-parallel overlap relies on one CUDA work queue per device.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A rank stuck in a collective fails the job instead of hanging it until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    hpd_cpus_per_task
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$HPD_CPUS_PER_TASK}
    # The script as submitted (Slurm's copy of it), logged to the tracking run.
    export HPD_SBATCH_SCRIPT=${HPD_SBATCH_SCRIPT:-$0}

    HPD_SRUN_ARGS=()
    local container_name=hpd-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        # pyxis keeps a named container until the job ends: the first step on a node creates
        # it from the image, later steps (preflight, then training) reuse it instead of
        # unpacking the image again. The restart count gives a requeued job a fresh one.
        HPD_SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE"
                        --container-name="$container_name"
                        --container-mounts="$HPD_HOME:$HPD_HOME${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                        --container-workdir="$HPD_HOME" --no-container-mount-home)
    fi
    hpd_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s):" \
        "$SLURM_JOB_NODELIST; rendezvous $MASTER_ADDR:$MASTER_PORT; python $HPD_PYTHON;" \
        "$HPD_CPUS_PER_TASK CPUs per task;" \
        "container ${CONTAINER_IMAGE:-none}${CONTAINER_IMAGE:+ (named $container_name)}"
}

# One task on the first node: the planner's dry run plus a check of every input path, so a
# layout that cannot fit or a missing checkpoint or dataset stops the job before any rank starts.
hpd_preflight() {
    local recipe=$1
    shift
    hpd_log "preflight: python -m hpd_megatron.plan --config $recipe --check-inputs $*"
    if ! srun "${HPD_SRUN_ARGS[@]}" --nodes=1 --ntasks=1 --cpus-per-task="$HPD_CPUS_PER_TASK" \
            "$HPD_PYTHON" -m hpd_megatron.plan \
            --config "$recipe" --nodes "$SLURM_JOB_NUM_NODES" \
            --gpus-per-node "${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}" \
            --gpu-mem-gb "${HPD_GPU_MEM_GB:-80}" --check-inputs "$@"; then
        hpd_log "error: preflight failed (above); no rank was started"
        exit 1
    fi
}

# srun every rank in the background so the batch shell can take the stop signal
# (--signal=B:USR1@...) and hand it to srun, which passes it to every task.
# Returns the step's exit code (the highest of its tasks').
hpd_run_step() {
    local step_pid status
    srun "${HPD_SRUN_ARGS[@]}" --cpus-per-task="$HPD_CPUS_PER_TASK" \
        --wait="${HPD_EXIT_GRACE_S:-120}" "$@" &
    step_pid=$!
    # shellcheck disable=SC2064  # the pid is fixed now, on purpose
    trap "hpd_log 'stop signal: passing it to the ranks'; kill -USR1 $step_pid" USR1
    while true; do
        status=0
        wait "$step_pid" || status=$?
        # A trapped signal interrupts wait (status > 128) while srun still runs: wait again.
        kill -0 "$step_pid" 2>/dev/null || break
    done
    trap - USR1
    return "$status"
}

# Train a recipe; on the trainer's stop code, requeue this same job id to resume.
hpd_train() {
    local recipe=$1 status=0
    shift
    hpd_preflight "$recipe" "$@"
    hpd_log "launching $SLURM_NTASKS rank(s): python -m hpd_megatron.train --config $recipe $*"
    hpd_run_step "$HPD_PYTHON" -m hpd_megatron.train --config "$recipe" "$@" || status=$?
    if (( status == HPD_STOP_EXIT_CODE )); then
        if (( ${SLURM_RESTART_COUNT:-0} >= ${HPD_MAX_REQUEUES:-50} )); then
            hpd_log "stopped after a checkpoint; not requeueing (restart ${SLURM_RESTART_COUNT:-0} of ${HPD_MAX_REQUEUES:-50})"
            exit "$status"
        fi
        hpd_log "the trainer saved and stopped; requeueing job $SLURM_JOB_ID to resume from its checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    hpd_log "the trainer exited with $status"
    exit "$status"
}
