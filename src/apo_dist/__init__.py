"""apo-dist: active preference learning (active DPO) for LLMs, from one CPU to a SLURM cluster."""

__version__ = "0.1.0"
