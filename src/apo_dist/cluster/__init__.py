"""Running stages on more than one process: `accelerate launch` here (local.py), srun steps and
sbatch jobs on SLURM (slurm.py), and the per-rank entry point (worker.py)."""
