"""Peak memory per rank of DPO training: 1 process vs 2-process DDP, ZeRO-2 and ZeRO-3.

    python benchmarks/memory.py [--steps 4] [--batch 4]

Each configuration trains SmolLM2-135M-Instruct (fp32, AdamW) for a few steps through the same
`train_dpo` the pipeline uses, launched with the accelerate configs in launch/accelerate/, and
every rank reports its peak resident memory (ru_maxrss). On CPUs the "device" memory is the
process's RAM, so this is what ZeRO saves per rank here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "launch" / "accelerate"
MODES = {"1 process": None, "DDP x2": "cpu_2proc.yaml", "ZeRO-2 x2": "zero2.yaml", "ZeRO-3 x2": "zero3.yaml"}


def worker(steps: int, batch: int) -> None:
    sys.path.insert(0, str(HERE))
    from common import model_path, text_pairs

    from apo_dist.models import load_tokenizer
    from apo_dist.training import train_dpo

    path = model_path()
    pairs = text_pairs(load_tokenizer(path), steps * batch)
    table = pd.DataFrame({"prompt_ids": [p for p, _, _ in pairs], "tokens_a": [a for _, a, _ in pairs],
                          "tokens_b": [b for _, _, b in pairs], "ref_logp_a": -30.0, "ref_logp_b": -30.0,
                          "label": 1.0})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tcfg = SimpleNamespace(beta=0.1, lr=1e-5, epochs=1, batch_size=batch, micro_batch_size=batch // world,
                           mixed_precision="no", gradient_checkpointing=False, max_grad_norm=1.0,
                           weight_decay=0.0, checkpoint_every_steps=0)
    with tempfile.TemporaryDirectory() as tmp:
        train_dpo(table, path, Path(tmp) / "policy", tcfg, seed=0, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("MEMORY " + json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_mb": peak_mb}), flush=True)


def run_mode(config: str | None, steps: int, batch: int) -> list[float]:
    from apo_dist.cluster.local import uses_deepspeed

    script = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--batch", str(batch)]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    env.pop("ACCELERATE_USE_CPU", None)
    if config is None:
        cmd = [sys.executable, *script]
    else:
        path = CONFIGS / config
        if not torch.cuda.is_available() and not uses_deepspeed(str(path)):
            env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", "2",
               "--num_cpu_threads_per_process", "1", *script]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    peaks = [json.loads(line[7:])["peak_mb"] for line in out.stdout.splitlines() if line.startswith("MEMORY ")]
    if out.returncode != 0 or not peaks:
        raise RuntimeError(f"{config or 'single process'} failed:\n{out.stderr[-3000:]}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.batch)
    sys.path.insert(0, str(HERE))
    from common import machine

    results = {mode: run_mode(config, args.steps, args.batch) for mode, config in MODES.items()}
    single = results["1 process"][0]
    print(f"machine: {machine()}")
    print(f"workload: SmolLM2-135M-Instruct fp32 + AdamW, {args.steps} steps of batch {args.batch} pairs")
    print("| configuration | peak RSS per rank (MB) | vs 1 process |")
    print("|---|---:|---:|")
    for mode, peaks in results.items():
        print(f"| {mode} | {', '.join(f'{p:.0f}' for p in peaks)} | {max(peaks) / single:.2f} |")
    zero3 = max(results["ZeRO-3 x2"])
    print(f"summary: zero3_peak={zero3:.0f}MB single_peak={single:.0f}MB ratio={zero3 / single:.2f}")


if __name__ == "__main__":
    main()
