"""The launcher prefixes a rule puts before `-m pipeline.<stage>`: one process, torchrun, srun + torchrun."""

import shlex

import pytest

from pipeline.launch import torchrun_command


def test_one_gpu_is_plain_python():
    assert torchrun_command(1) == "python"


def test_one_node_several_gpus_is_standalone_torchrun():
    assert torchrun_command(4) == "torchrun --standalone --nproc-per-node=4"


def test_several_nodes_start_one_torchrun_per_node_under_srun():
    words = shlex.split(torchrun_command(8, nodes=2), posix=True)
    assert words[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "bash", "-c"]
    assert words[7] == "torchrun"  # $0 of the task's shell, which resolves the step's first node itself
    torchrun = shlex.split(words[6])
    assert torchrun[:2] == ["exec", "torchrun"] and torchrun[-1] == "$@"
    assert "--nnodes=2" in torchrun and "--nproc-per-node=8" in torchrun and "--rdzv-backend=c10d" in torchrun
    assert "--rdzv-id=$SLURM_JOB_ID" in torchrun
    assert "--rdzv-endpoint=$(scontrol show hostnames $SLURM_STEP_NODELIST | head -n 1):29500" in words[6]


@pytest.mark.parametrize("gpus, nodes", [(0, 1), (1, 0), (-2, 3)])
def test_nonsense_sizes_are_refused(gpus, nodes):
    with pytest.raises(ValueError, match="at least 1"):
        torchrun_command(gpus, nodes)
