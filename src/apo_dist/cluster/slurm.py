"""SLURM: sbatch scripts rendered from the templates in slurm/, and stages run as srun steps in a job.

Outside a job, `submit` renders the template that fits the config (run.sbatch: one or several
nodes; hetjob.sbatch: vLLM nodes + training nodes) into <run>/slurm/ and calls sbatch;
`submit_sweep` does the same for a sweep's job array (array.sbatch) plus an aggregation job that
waits for it. Every job is recorded in <dir>/slurm/jobs.jsonl for `apo-dist status`.

Inside a job the coordinator runs in the batch script. `srun_stage` wraps a stage's
`accelerate launch` in an srun step over the training nodes with a multi-node rendezvous (the
first node's name as the main process address, a free port, machine rank = SLURM_NODEID);
`generation_servers` keeps vLLM servers up as one long-lived srun step on the generation nodes of
a heterogeneous job; `requeue` puts the job back in the queue after the warning signal.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..util import free_port, log_tail

log = logging.getLogger("apo_dist.slurm")

TEMPLATES = Path(__file__).resolve().parents[3] / "slurm"
PLACEHOLDER = re.compile(r"{{(\w+)}}")

# Inside an srun step, each task substitutes its node's values into its command line.
NODE_NAME, NODE_ID = "__SLURMD_NODENAME__", "__SLURM_NODEID__"
_SUBSTITUTE = ('args=(); for a in "$@"; do a="${a//' + NODE_ID + '/$SLURM_NODEID}"; '
               'args+=("${a//' + NODE_NAME + '/$SLURMD_NODENAME}"); done; ')


class SlurmError(RuntimeError):
    """A SLURM command failed; the message has its output."""


# --- inside a job ------------------------------------------------------------------------------
def in_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def use_slurm(launcher) -> bool:
    """Run stages as srun steps (launcher: the `launcher` section): executor=slurm, or auto inside a SLURM job."""
    return launcher.executor == "slurm" or (launcher.executor == "auto" and in_job())


def scontrol(*args: str) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def hostnames(nodelist: str) -> list[str]:
    """ci-node[1-2] -> [ci-node1, ci-node2], as SLURM expands it."""
    return scontrol("show", "hostnames", nodelist).split()


def is_hetjob() -> bool:
    return int(os.environ.get("SLURM_HET_SIZE", "1")) > 1


def training_nodes() -> list[str]:
    """Nodes for scoring and training: the second component of a heterogeneous job, else all."""
    return hostnames(os.environ["SLURM_JOB_NODELIST_HET_GROUP_1" if is_hetjob() else "SLURM_JOB_NODELIST"])


def srun_stage(command_for: Callable[[list[str]], list[str]], processes: int) -> list[str]:
    """An srun step over the training nodes, one task per node, each running the `accelerate launch`
    command that `command_for(rendezvous options)` builds for its share of the ranks."""
    nodes, port = training_nodes(), free_port()
    if processes % len(nodes):
        raise ValueError(f"{processes} processes do not split evenly over {len(nodes)} nodes {nodes}")
    cmd = command_for(["--num_machines", str(len(nodes)), "--machine_rank", NODE_ID,
                       "--main_process_ip", nodes[0], "--main_process_port", str(port)])
    announce = (f'echo "rendezvous: node $SLURMD_NODENAME machine_rank $SLURM_NODEID of {len(nodes)} '
                f'-> main process {nodes[0]}:{port}, {processes} ranks"; ')
    return [*srun_prefix(len(nodes), group=1 if is_hetjob() else None), "--kill-on-bad-exit=1",
            "bash", "-c", _SUBSTITUTE + announce + 'exec "${args[@]}"', "stage", *cmd]


def srun_prefix(nodes: int, group: int | None) -> list[str]:
    return ["srun", *([f"--het-group={group}"] if group is not None else []), f"--nodes={nodes}",
            f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap"]


@contextmanager
def generation_servers(gen, dtype: str, servers_per_node: int, run_dir: Path, model_path: str, lora_rank: int = 0):
    """vLLM servers on the first component of a heterogeneous job (`servers_per_node`: slurm.servers_per_node
    per node), one srun step kept up for the whole run; yields their base URLs and stops the step at the end.

    `gen`: the `generation` section (gen.vllm: the engine options; gen.servers.startup_timeout);
    `dtype`: model.dtype, the servers' dtype where generation.vllm.dtype is null; `lora_rank`:
    training.lora.rank (> 0: the servers load the policy's LoRA adapters at runtime)."""
    from ..generation.vllm_servers import serve_args

    nodes = hostnames(os.environ["SLURM_JOB_NODELIST_HET_GROUP_0"])
    workdir = run_dir / "slurm" / f"servers_{os.environ['SLURM_JOB_ID']}"
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.urls"):
        old.unlink()
    cmd = [*srun_prefix(len(nodes), group=0), "bash", "-c", _SUBSTITUTE + 'exec "${args[@]}"', "serve",
           sys.executable, "-m", "apo_dist.generation.vllm_servers", "serve", "--model", model_path,
           "--num", str(servers_per_node), "--workdir", str(workdir / NODE_NAME), "--host", "0.0.0.0",
           "--urls-file", str(workdir / f"{NODE_NAME}.urls"),
           "--startup-timeout", str(gen.servers.startup_timeout), *serve_args(gen.vllm, dtype, lora_rank)]
    log_path = workdir / "srun.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + gen.servers.startup_timeout + 60
        while len(list(workdir.glob("*.urls"))) < len(nodes):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_tail(log_path)
                raise SlurmError(f"vLLM servers on {','.join(nodes)} did not come up (srun exit "
                                 f"{proc.poll()}); server logs in {workdir}; end of {log_path}:\n{tail}")
            time.sleep(1)
        urls = [u for f in sorted(workdir.glob("*.urls")) for u in f.read_text().split()]
        log.info("vLLM servers on %s: %s", ",".join(nodes), " ".join(urls))
        yield urls
    finally:
        if proc.poll() is None:
            proc.terminate()  # srun passes SIGTERM to the tasks, which stop their servers
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def requeue() -> str:
    """Put this job back in the queue (it restarts from the batch script, which resumes the run)."""
    job = os.environ["SLURM_JOB_ID"]
    scontrol("requeue", job)
    return job


# --- submitting ---------------------------------------------------------------------------------
def render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise KeyError(f"slurm/{template}: no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def sbatch_lines(options: dict[str, object], extra: list[str] = ()) -> str:
    """#SBATCH lines for the options that are set (empty string or 0 = leave it to the cluster)."""
    lines = [f"#SBATCH --{key}={value}" for key, value in options.items() if value not in ("", 0, None)]
    return "\n".join([*lines, *(f"#SBATCH {e}" for e in extra)])


def resources(sl, gpus_per_node: int) -> str:
    return sbatch_lines({"partition": sl.partition, "account": sl.account, "qos": sl.qos,
                         "gpus-per-node": gpus_per_node, "cpus-per-task": sl.cpus_per_task, "mem": sl.mem},
                        list(sl.extra))


def common_values(cfg, job_name: str, log_dir: Path, command: list[str]) -> dict[str, str]:
    sl = cfg.slurm
    return {"job_name": job_name, "time": sl.time, "signal_seconds": str(sl.signal_seconds),
            "log_dir": str(log_dir), "setup": sl.setup.rstrip(), "command": shlex.join(command),
            "nodes": str(sl.nodes), "resources": resources(sl, sl.gpus_per_node)}


def python(cfg) -> str:
    return cfg.slurm.python or sys.executable


def sbatch(script: Path, *options: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_folder(cfg, root: Path) -> tuple[Path, Path]:
    """<root>/slurm/ with the resolved config the job runs; returns (folder, config path)."""
    from ..config import to_yaml

    folder = root / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder, folder / "config.yaml"


def record_job(folder: Path, job: str, kind: str, script: Path) -> None:
    with open(folder / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "kind": kind, "script": str(script), "time": time.time()}) + "\n")


def submit(cfg, run_dir: Path) -> tuple[str, Path]:
    """Render run.sbatch (or hetjob.sbatch) for `cfg` into <run_dir>/slurm/ and sbatch it."""
    run_dir = run_dir.resolve()
    active = [j for j in jobs(run_dir) if j["state"] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")]
    if active:
        raise SlurmError(f"{run_dir} already has job {active[0]['job']} {active[0]['state']}; "
                         f"wait for it or `scancel {active[0]['job']}`")
    folder, config_path = job_folder(cfg, run_dir)
    command = [python(cfg), "-m", "apo_dist.cli", "run", str(config_path), "--run-dir", str(run_dir), "--no-progress"]
    values = common_values(cfg, cfg.name, folder, command)
    template = "hetjob.sbatch" if cfg.slurm.generation_nodes else "run.sbatch"
    if cfg.slurm.generation_nodes:
        values.update(generation_nodes=str(cfg.slurm.generation_nodes),
                      generation_resources=resources(cfg.slurm, cfg.slurm.generation_gpus_per_node))
    script = folder / template
    script.write_text(render(template, values))
    job = sbatch(script)
    record_job(run_dir, job, template.split(".")[0], script)
    return job, script


def submit_sweep(cfg, root: Path, arms: int, sweep_args: list[str]) -> tuple[str, str, Path]:
    """The sweep as a job array (task K runs arm K: `apo-dist sweep ... --task K`), and an
    aggregation job that runs when every task has succeeded. Returns (array job, aggregate job, script)."""
    root = root.resolve()
    folder, config_path = job_folder(cfg, root)
    command = [python(cfg), "-m", "apo_dist.cli", "sweep", str(config_path), *sweep_args, "--root", str(root),
               "--no-progress"]
    values = common_values(cfg, f"{cfg.name}-sweep", folder, command)
    values["array"] = f"0-{arms - 1}" + (f"%{cfg.slurm.array_parallel}" if cfg.slurm.array_parallel else "")
    script = folder / "array.sbatch"
    script.write_text(render("array.sbatch", values))
    array_job = sbatch(script)
    record_job(root, array_job, "array", script)
    aggregate = [python(cfg), "-m", "apo_dist.cli", "aggregate", str(root)]
    setup = f"{cfg.slurm.setup.rstrip()}\n" if cfg.slurm.setup.strip() else ""
    agg_script = folder / "aggregate.sbatch"
    agg_script.write_text(f"#!/bin/bash\n{sbatch_lines({'partition': cfg.slurm.partition, 'account': cfg.slurm.account})}\n"
                          f"{setup}exec {shlex.join(aggregate)}\n")
    agg_job = sbatch(agg_script, f"--dependency=afterok:{array_job}", f"--job-name={cfg.name}-aggregate",
                     f"--output={folder}/%x-%j.out")
    record_job(root, agg_job, "aggregate", agg_script)
    return array_job, agg_job, script


# --- status ------------------------------------------------------------------------------------
def job_state(job: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason or node list) per job or array task; SLURM forgets jobs MinJobAge
    after they end, and those read as UNKNOWN."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i|%T|%R"], capture_output=True, text=True)
    rows = [tuple(line.split("|", 2)) for line in proc.stdout.splitlines() if line.strip()]
    if rows:
        return rows
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "ArrayTaskId" in fields:
            rows.append((f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}", fields["JobState"], ""))
        elif "JobId" in fields:
            rows.append((fields["JobId"], fields.get("JobState", "UNKNOWN"), ""))
    return rows or [(job, "UNKNOWN", "")]


def jobs(folder: Path) -> list[dict]:
    """The jobs submitted for a run or sweep folder, each with its current state (first task's for arrays)."""
    path = Path(folder) / "slurm" / "jobs.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        states = job_state(rec["job"])
        out.append({**rec, "state": states[0][1], "tasks": states})
    return out
