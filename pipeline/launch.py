"""How a stage process is started: plain python, torchrun on one node, or srun + torchrun across nodes.

One node, `gpus` > 1: `torchrun --standalone --nproc-per-node=<gpus>` inside the job. Under the SLURM
executor the plugin already runs the job in `srun -n1 --gpus=<gpus>`, so torchrun's processes share
that step's GPUs and the world size is `gpus`.

Several nodes (a trainee's `nodes`, SLURM only): the job is submitted with `nodes=N` and one task per node
(workflow/rules/common.smk: multi_node_resources); `srun` starts one torchrun per node, which rendezvous (c10d)
on the first node of the allocation; world size = nodes x gpus. `torchrun_command(gpus, nodes)` builds that
line.

    python -m pipeline.launch --gpus 2            # prints the launcher prefix for a rule's shell
"""

from __future__ import annotations

import argparse

RENDEZVOUS_PORT = 29500
# The first host of the srun step, resolved by each task's own shell: the executor plugin strips SLURM_JOB_NODELIST
# from the job's environment, and srun sets the step's for its tasks.
FIRST_NODE = "$(scontrol show hostnames $SLURM_STEP_NODELIST | head -n 1)"


def torchrun_command(gpus: int, nodes: int = 1) -> str:
    """Shell prefix that starts `-m pipeline.<stage> ...` on `gpus` processes per node, `nodes` nodes."""
    if gpus < 1 or nodes < 1:
        raise ValueError(f"gpus and nodes must be at least 1 (got gpus={gpus}, nodes={nodes})")
    if gpus == 1 and nodes == 1:
        return "python"
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node={gpus}"
    torchrun = (f"exec torchrun --nnodes={nodes} --nproc-per-node={gpus} --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID "
                f'--rdzv-endpoint={FIRST_NODE}:{RENDEZVOUS_PORT} "$@"')
    return f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 bash -c '{torchrun}' torchrun"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nodes", type=int, default=1)
    args = p.parse_args(argv)
    print(torchrun_command(args.gpus, args.nodes))


if __name__ == "__main__":
    main()
