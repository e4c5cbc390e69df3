"""Run a scoring or training stage as an `accelerate launch` job and wait for it.

Inside a SLURM job the launch is an srun step over the job's training nodes (slurm.py).
stdout and stderr of all ranks go to <round>/logs/STAGE.log. A failing rank makes the launcher
stop the others; the stage then fails with the end of the log, which holds that rank's error.

A launch never outlives the coordinator that started it, whatever ends the coordinator: the
launcher (`accelerate launch`, or srun) runs in its own session and gets a signal from the kernel
when the coordinator dies (PR_SET_PDEATHSIG; SIGKILL for `accelerate launch`, SIGTERM for srun,
which cancels its step); each rank, a child of the launcher in a session of its own (torch elastic),
does the same towards the launcher and exits at once if the launcher or the coordinator is already
gone (worker.py). When the coordinator itself stops (an exception, SIGINT, SystemExit) it stops
the launch's process group before going on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from ..errors import StageFailed
from ..rundir import RunDir
from ..util import die_with_parent, free_port, log_tail, stop_group
from .slurm import srun_stage, use_slurm

COORDINATOR_ENV = "APO_DIST_COORDINATOR_PID"  # set for a local launch: the ranks' grandparent (worker.py)


def accelerate_command(launcher, stage: str, run_dir: Path, round_: int, processes: int,
                       rendezvous: list[str] | None = None) -> list[str]:
    """`accelerate launch` of the worker (launcher: the `launcher` section); `rendezvous`: the machine
    options (default: this machine)."""
    rendezvous = rendezvous or ["--num_machines", "1", "--main_process_port", str(free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), *rendezvous]
    if launcher.accelerate_config:
        cmd += ["--config_file", str(Path(launcher.accelerate_config).expanduser().resolve())]
    elif processes > 1:
        cmd += ["--multi_gpu"]
    if not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // processes)
        cmd += ["--num_cpu_threads_per_process", str(threads), "--dynamo_backend", "no", "--mixed_precision", "no"]
    return cmd + ["-m", "apo_dist.cluster.worker", stage, "--run-dir", str(run_dir.resolve()), "--round", str(round_)]


def uses_deepspeed(accelerate_config: str) -> bool:
    if not accelerate_config:
        return False
    import yaml

    return yaml.safe_load(Path(accelerate_config).expanduser().read_text()).get("distributed_type") == "DEEPSPEED"


def launch_stage(launcher, rd: RunDir, stage: str, round_: int, processes: int) -> dict:
    """Run `stage` of `round_` on `processes` ranks (launcher: the `launcher` section); returns the
    metrics rank 0 left behind."""
    logs = rd.round_dir(round_) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    metrics = logs / f"{stage}.metrics.json"
    metrics.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    if not torch.cuda.is_available() and not uses_deepspeed(launcher.accelerate_config):
        # The GPU launch configs run DDP on CPUs this way (over gloo). DeepSpeed must not see it:
        # it finds the CPU by itself and would otherwise be switched off.
        env["ACCELERATE_USE_CPU"] = "true"
    log_path = logs / f"{stage}.log"
    env.pop(COORDINATOR_ENV, None)
    if use_slurm(launcher):  # an srun step over the job's training nodes
        cmd = srun_stage(lambda rendezvous: accelerate_command(launcher, stage, rd.root, round_, processes,
                                                               rendezvous), processes)
        death_signal = signal.SIGTERM  # srun cancels its step on SIGTERM; a SIGKILLed srun would not
    else:
        cmd = accelerate_command(launcher, stage, rd.root, round_, processes)
        death_signal = signal.SIGKILL
        env[COORDINATOR_ENV] = str(os.getpid())
    with open(log_path, "ab") as log:
        log.write(f"\n=== {' '.join(cmd)}\n".encode())
        log.flush()
        returncode = run_launch(cmd, log, env, death_signal)
    if returncode != 0 or not metrics.exists():
        tail = log_tail(log_path, 40)
        raise StageFailed(f"round {round_} stage {stage} failed on {processes} processes "
                          f"(exit {returncode}); end of {log_path}:\n{tail}")
    return json.loads(metrics.read_text())


def run_launch(cmd: list[str], log, env: dict, death_signal: int) -> int:
    """Run the launcher `cmd` in a session of its own, tied to this process (it gets `death_signal`
    when we die), and wait for it; if waiting ends any other way (KeyboardInterrupt, SystemExit, an
    exception) stop its process group first. Returns its exit status."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=partial(die_with_parent, death_signal, os.getpid()))
    try:
        return proc.wait()
    finally:
        if proc.returncode is None:
            stop_launch(proc)


def stop_launch(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop the launch's process group (torch elastic then stops its ranks; srun cancels its step).
    Ranks that torch elastic started in sessions of their own die with the launcher (worker.py)."""
    stop_group(proc, grace)
