"""Peak memory per rank of DPO training: one process vs DDP, ZeRO-2, ZeRO-3, optimizer offload, LoRA.

    python benchmarks/memory.py [--size 360m] [--steps 4] [--batch 4] [--modes "ZeRO-3 x2" ...]

Each configuration trains a model (fp32 weights, AdamW) for a few steps through the same
`train_dpo` the pipeline uses, launched with the accelerate configs in launch/accelerate/. Every
rank reports the peak and the end-of-phase resident memory of each phase of its run: start
(imports), load, prepare (LoRA adapter, optimizer, accelerator.prepare), step 1, steps 2+, save.
Peaks are VmHWM, reset between phases through /proc/self/clear_refs. On CPUs the "device" memory
is the process's RAM, so this is what ZeRO saves per rank here.

Sizes: `135m` is SmolLM2-135M-Instruct; `360m` a randomly initialised Llama of SmolLM2-360M's
shape (362M parameters; the values of the weights do not change the memory), saved once to a
temporary folder with SmolLM2's tokenizer. Configurations run one at a time, each once
MemAvailable is at least `--headroom` times its estimated total; one still short of it after
`--max-wait-s` is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "launch" / "accelerate"
MALLOC_MMAP = "65536"  # glibc's MALLOC_MMAP_THRESHOLD_ in the allocator rows: 64 KiB


@dataclass(frozen=True)
class Mode:
    config: str | None = None  # accelerate config in launch/accelerate/ (None: one plain process)
    offload_optimizer: bool = False  # DeepSpeed offload_optimizer device cpu
    lora_rank: int = 0
    malloc_mmap: bool = False  # every allocation from 64 KiB up is its own mmap, returned when freed

    @property
    def ranks(self) -> int:
        return 1 if self.config is None else 2

    @property
    def zero(self) -> int:
        return {"zero2.yaml": 2, "zero3.yaml": 3}.get(self.config, 0)


MODES = {
    "1 process": Mode(),
    "DDP x2": Mode("cpu_2proc.yaml"),
    "ZeRO-2 x2": Mode("zero2.yaml"),
    "ZeRO-3 x2": Mode("zero3.yaml"),
    "ZeRO-2 x2, optimizer offloaded": Mode("zero2.yaml", offload_optimizer=True),
    "ZeRO-3 x2, optimizer offloaded": Mode("zero3.yaml", offload_optimizer=True),
    "LoRA r16, 1 process": Mode(lora_rank=16),
    "LoRA r16, ZeRO-3 x2": Mode("zero3.yaml", lora_rank=16),
    "1 process, 64 KiB mmap threshold": Mode(malloc_mmap=True),
    "ZeRO-3 x2, 64 KiB mmap threshold": Mode("zero3.yaml", malloc_mmap=True),
}
SIZES = {  # the configurations each size runs by default
    "135m": ["1 process", "DDP x2", "ZeRO-2 x2", "ZeRO-3 x2"],
    "360m": ["1 process", "ZeRO-2 x2", "ZeRO-3 x2", "ZeRO-2 x2, optimizer offloaded",
             "ZeRO-3 x2, optimizer offloaded", "LoRA r16, 1 process", "LoRA r16, ZeRO-3 x2",
             "1 process, 64 KiB mmap threshold", "ZeRO-3 x2, 64 KiB mmap threshold"],
}
PHASES = ["start", "load", "prepare", "step 1", "steps 2+", "save"]


def baseline(name: str) -> str:
    """The one-process configuration `name` is compared with: the same allocator setting."""
    return "1 process, 64 KiB mmap threshold" if MODES[name].malloc_mmap else "1 process"


def smollm2_360m_shape():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                       num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=2048,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def prepare_model(size: str, folder: Path) -> tuple[str, int]:
    """(model folder, parameter count) of `size`; the random model is written under `folder`."""
    from transformers import LlamaForCausalLM

    from apo_dist.models import load_tokenizer
    from common import model_path

    if size == "135m":
        return model_path(), 134_515_008
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_360m_shape())
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(model_path()).save_pretrained(folder)
    return str(folder), params


# ---- one rank ----

class PhaseMemory:
    """Resident memory of each phase of this process: its peak (VmHWM, reset at every mark) and
    what it still holds at the end (VmRSS), in MB."""

    def __init__(self):
        self.peak: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self.mark("start")

    @staticmethod
    def _status_mb(field: str) -> float:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

    def mark(self, phase: str) -> None:
        """End `phase` (a phase marked again keeps its highest peak)."""
        self.peak[phase] = max(self.peak.get(phase, 0.0), self._status_mb("VmHWM"))
        self.held[phase] = self._status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def worker(model: str, steps: int, batch: int, lora_rank: int, report_dir: Path) -> None:
    """Train and write this rank's phases to `report_dir`/rank<RANK>.json."""
    memory = PhaseMemory()
    sys.path.insert(0, str(HERE))
    from common import text_pairs

    import apo_dist.training as training
    from apo_dist.config import LoraSettings, TrainingConfig
    from apo_dist.models import load_tokenizer

    # The phase ends that train_dpo has no callback for: after the model load, after setup_training.
    load, setup = training.load_training_model, training.setup_training
    training.load_training_model = lambda *a, **k: (load(*a, **k), memory.mark("load"))[0]
    training.setup_training = lambda *a, **k: (setup(*a, **k), memory.mark("prepare"))[0]

    pairs = text_pairs(load_tokenizer(model), steps * batch)
    table = pd.DataFrame({"prompt_ids": [p for p, _, _ in pairs], "tokens_a": [a for _, a, _ in pairs],
                          "tokens_b": [b for _, _, b in pairs], "ref_logp_a": -30.0, "ref_logp_b": -30.0,
                          "label": 1.0})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tcfg = TrainingConfig(beta=0.1, lr=1e-5, epochs=1, batch_size=batch, micro_batch_size=batch // world,
                          max_grad_norm=1.0, checkpoint_every_steps=0, lora=LoraSettings(rank=lora_rank))
    with tempfile.TemporaryDirectory() as tmp:
        training.train_dpo(table, model, Path(tmp) / "policy", tcfg, seed=0, progress=False,
                           on_step=lambda step: memory.mark("step 1" if step == 1 else "steps 2+"))
        memory.mark("save")
    rank = int(os.environ.get("RANK", "0"))
    (report_dir / f"rank{rank}.json").write_text(json.dumps({"peak": memory.peak, "held": memory.held}))


# ---- the launcher ----

def available_mb() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) / 1024


def estimate_mb(mode: Mode, params: int) -> float:
    """A configuration's expected total over its ranks: per rank 1 GB (imports, activations,
    buffers) and the fp32 state, in bytes a parameter: weights 4 (ZeRO-3 shards them; LoRA keeps
    only these), gradients 4 and AdamW 8, under ZeRO also DeepSpeed's master copy 4 and with
    offload its gradient buffer 4, all sharded; under ZeRO-3 rank 0 gathers the weights to save."""
    zero3 = mode.zero == 3
    state = 4 / mode.ranks if zero3 else 4
    if not mode.lora_rank:
        state += (16 + 4 * mode.offload_optimizer) / mode.ranks if mode.zero else 12
    return (mode.ranks * (1024 * 2**20 + state * params) + 4 * params * zero3) / 2**20


def wait_for_memory(need_mb: float, headroom: float, max_wait_s: float, poll_s: float = 30) -> bool:
    """Whether MemAvailable reached `headroom` x `need_mb` within `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    while available_mb() < headroom * need_mb:
        if time.monotonic() > deadline:
            return False
        print(f"waiting: MemAvailable {available_mb():.0f} MB < {headroom} x {need_mb:.0f} MB", file=sys.stderr,
              flush=True)
        time.sleep(poll_s)
    return True


def run_mode(mode: Mode, model: str, steps: int, batch: int) -> list[dict]:
    """The phase reports of every rank of one configuration, rank order."""
    from apo_dist.cluster.local import uses_deepspeed

    env = dict(os.environ, PYTHONPATH=str(HERE))
    env.pop("ACCELERATE_USE_CPU", None)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode.malloc_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = MALLOC_MMAP
    launch = [sys.executable]
    if mode.config is not None:
        path = CONFIGS / mode.config
        if not torch.cuda.is_available() and not uses_deepspeed(str(path)):
            env["ACCELERATE_USE_CPU"] = "true"
        offload = ["--offload_optimizer_device", "cpu"] if mode.offload_optimizer else []
        launch += ["-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", "2",
                   "--num_cpu_threads_per_process", "1", *offload]
    with tempfile.TemporaryDirectory() as report_dir:  # a file per rank: the ranks' stdout lines can interleave
        script = [str(Path(__file__).resolve()), "--worker", model, "--steps", str(steps), "--batch", str(batch),
                  "--lora-rank", str(mode.lora_rank), "--report-dir", report_dir]
        out = subprocess.run([*launch, *script], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
        return [json.loads(Path(report_dir, f"rank{rank}.json").read_text()) for rank in range(mode.ranks)]


def print_tables(results: dict[str, list[dict]]) -> None:
    """The peak per rank against its one-process baseline, then each phase's peak and end on the
    rank that peaked higher."""
    peaks = {name: [max(r["peak"].values()) for r in reports] for name, reports in results.items()}
    print("| configuration | peak RSS per rank (MB) | vs 1 process |")
    print("|---|---:|---:|")
    for name, per_rank in peaks.items():
        ratio = max(per_rank) / peaks[baseline(name)][0]
        print(f"| {name} | {', '.join(f'{p:.0f}' for p in per_rank)} | {ratio:.2f} |")
    print("\nEach phase on the rank with the higher peak: peak / held at its end (MB)")
    print("| configuration | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for name, reports in results.items():
        r = max(reports, key=lambda r: max(r["peak"].values()))
        print(f"| {name} | " + " | ".join(f"{r['peak'][p]:.0f} / {r['held'][p]:.0f}" for p in PHASES) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="360m")
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        help="default: the size's list; the one-process baselines they need are added")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--headroom", type=float, default=2.0, help="start a configuration only when "
                        "MemAvailable is this many times its estimate")
    parser.add_argument("--max-wait-s", type=float, default=1800, help="skip a configuration after waiting this long")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.batch, args.lora_rank, args.report_dir)
    sys.path.insert(0, str(HERE))
    from common import machine

    wanted = args.modes or SIZES[args.size]
    names = list(dict.fromkeys([baseline(m) for m in wanted] + wanted))
    results, skipped = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        model, params = prepare_model(args.size, Path(tmp))
        for name in names:
            need = estimate_mb(MODES[name], params)
            if not wait_for_memory(need, args.headroom, args.max_wait_s):
                skipped.append(f"{name} (estimated {need:.0f} MB, MemAvailable {available_mb():.0f} MB)")
                continue
            start = f"MemAvailable {available_mb():.0f} MB, load average {os.getloadavg()[0]:.1f}"
            results[name] = run_mode(MODES[name], model, args.steps, args.batch)
            peaks = [f"{max(r['peak'].values()):.0f}" for r in results[name]]
            print(f"{name}: started at {start}; peak {', '.join(peaks)} MB", flush=True)
    print(f"machine: {machine()}")
    print(f"workload: {args.size} ({params / 1e6:.1f}M parameters), fp32 + AdamW, {args.steps} steps of "
          f"batch {args.batch} pairs (micro-batch {args.batch} / ranks)")
    print_tables({name: reports for name, reports in results.items() if baseline(name) in results})
    for name in skipped:
        print(f"skipped, short of {args.headroom}x memory: {name}")
    if "ZeRO-3 x2" in results:
        zero3 = max(max(r["peak"].values()) for r in results["ZeRO-3 x2"])
        single = max(results["1 process"][0]["peak"].values())
        print(f"summary: zero3_peak={zero3:.0f}MB single_peak={single:.0f}MB ratio={zero3 / single:.2f}")


if __name__ == "__main__":
    main()
