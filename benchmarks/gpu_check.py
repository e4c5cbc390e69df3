"""The GPU check: the whole loop on one GPU, each stage's seconds, memory, utilisation and device.

    bash launch/gpu_check.sh run            # on the GPU machine (installs the carried wheels first)
    PYTHONPATH=src python benchmarks/gpu_check.py --smoke --out /tmp/gpu.md   # the same steps on a CPU, tiny

Steps, each an `apo-dist` command in its own process (as a user runs them), on the visible GPU:

1. The quickstart end to end with the transformers backend, in fp32 and in bf16 (model.dtype).
2. One ZeRO-3 training stage: round 0 of the bf16 quickstart trained again under
   launch/accelerate/zero3.yaml with one rank (then evaluated).
3. A rehearsal of configs/paper_imdb.yaml's first round at its full counts (32,768 pool prompts,
   262,144 entropy samples, 4,096 candidate pairs, 128 labels, 1,024 eval prompts) with a randomly
   initialised ~1B Llama (TinyLlama-1.1B's shape) as the stand-in model, next to plan.py's estimate
   of every stage for the same config.

A sampler polls nvidia-smi twice a second; a stage's peak memory and mean utilisation are taken
over its window in metrics.jsonl (end time minus seconds). The device is the one each stage's model
sat on, as the stage recorded it. Everything goes to --out (docs/gpu.md) with the machine and the
versions. Without a GPU it stops at once with exit 3 (--smoke runs the steps on tiny sizes on a CPU
to check this script).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}
LINES: list[str] = []


def emit(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


class GPUSampler:
    """nvidia-smi every 0.5 s in a thread: (time, utilisation %, memory used MiB)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, start: float, end: float) -> tuple[float | None, float | None]:
        """(peak memory MiB, mean utilisation %) between two times; None without samples."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return None, None
        return max(s[2] for s in inside), sum(s[1] for s in inside) / len(inside)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()


def apo_dist(*args: str, log: Path) -> float:
    """Run `apo-dist ARGS` in its own process; returns its wall time; raises on failure."""
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "apo_dist.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"apo-dist {' '.join(args)} exited {done.returncode}; end of {log}:\n{tail}")
    return time.time() - t0


def stage_table(run_dir: Path, sampler: GPUSampler) -> dict[str, dict]:
    """Per stage of every round (last record wins): seconds, device, peak MiB, mean utilisation."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        peak, util = sampler.window(m["time"] - m["seconds"], m["time"])
        rows[f"{m['round']}/{m['stage']}"] = {"seconds": m["seconds"], "device": m.get("device", "-"),
                                               "peak_mib": peak, "util": util}
    emit("| round/stage | seconds | model on | peak GPU memory (MiB) | mean GPU utilisation |")
    emit("|---|---:|---|---:|---:|")
    for key, r in rows.items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        util = "-" if r["util"] is None else f"{r['util']:.0f}%"
        emit(f"| {key} | {r['seconds']:.1f} | {r['device']} | {peak} | {util} |")
    return rows


def win_rates(run_dir: Path) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(run_dir.glob("round_*/eval.json"))]
    for e in results:
        z = (e["win_rate"] - 0.5) / e["stderr"] if e["stderr"] else float("nan")
        emit(f"- round {e['round']}: {e['labels']} labels, win-rate {e['win_rate']:.3f} ± {e['stderr']:.3f} "
             f"(n={e['n']}, ties {e['tie_rate']:.2f}), {z:+.1f} standard errors from 0.5")
    return results


def build_stand_in(folder: Path, tokenizer_from: str, shape: dict) -> Path:
    """A randomly initialised Llama of `shape` with the tokenizer of `tokenizer_from`, saved in fp32."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))},
                         head_dim=shape["hidden_size"] // shape["num_attention_heads"], max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def versions() -> str:
    names = ("torch", "transformers", "accelerate", "deepspeed", "omegaconf", "datasets", "vllm")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def machine() -> str:
    if torch.cuda.is_available():
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        return f"{smi}; {os.cpu_count()} CPU cores; {platform.platform()}"
    return f"no GPU (smoke run); {os.cpu_count()} CPU cores; {platform.processor() or platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpu.md"))
    parser.add_argument("--work", default="/tmp/apo-dist-gpu-check", help="run directories and logs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: checks this script, measures nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). This check measures "
              "the loop on a GPU: run it on a GPU machine (launch/gpu_check.sh), or pass --smoke to try the "
              "steps on tiny sizes here.", file=sys.stderr)
        return 3
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = GPUSampler()
    failures = []
    emit("# apo-dist on one GPU")
    emit("")
    emit(f"Written by `benchmarks/gpu_check.py{' --smoke' if args.smoke else ''}` on "
         f"{time.strftime('%Y-%m-%d')}. Machine: {machine()}. Versions: {versions()}.")

    from apo_dist.assets import cache_dir, ensure_model

    sft = str(ensure_model("smollm2-135m-instruct", cache_dir()))
    quick = ["configs/quickstart.yaml", "--no-progress", "generation.backend=hf"]
    if args.smoke:  # a random tiny policy with SmolLM2's tokenizer and a few labels: seconds on a CPU
        tiny = build_stand_in(work / "tiny", sft, {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "num_key_value_heads": 2,
                                                   "vocab_size": 49152, "tie_word_embeddings": True})
        quick += [f"model.policy={tiny}", "acquisition.labels_per_round=8", "data.n_eval=16",
                  "generation.max_new_tokens=4", "training.epochs=1"]

    for dtype in ("float32", "bfloat16"):
        emit("")
        emit(f"## Quickstart, transformers generate, model.dtype={dtype}")
        emit("")
        run_dir = work / f"quickstart_{dtype}"
        try:
            wall = apo_dist("run", *quick, "--run-dir", str(run_dir), f"model.dtype={dtype}",
                            log=work / f"quickstart_{dtype}.log")
            emit(f"Wall time {wall:.0f} s.")
            emit("")
            stage_table(run_dir, sampler)
            emit("")
            results = win_rates(run_dir)
            last = results[-1]
            if dtype == "bfloat16" and not args.smoke and not last["win_rate"] - 0.5 > 2 * last["stderr"]:
                failures.append("the bf16 quickstart did not beat SFT by more than 2 standard errors")
        except RuntimeError as e:
            failures.append(str(e).splitlines()[0])
            emit(f"FAILED: {e}")

    emit("")
    emit("## One ZeRO-3 training stage (launch/accelerate/zero3.yaml, one rank), round 0 of the bf16 quickstart")
    emit("")
    zero3 = work / "zero3"
    try:
        shutil.copytree(work / "quickstart_bfloat16", zero3)
        for path in ("round_0000/policy", "round_0000/.train.manifest.json", "round_0001"):
            p = zero3 / path
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        wall = apo_dist("run", *quick, "--run-dir", str(zero3), "model.dtype=bfloat16", "loop.rounds=1",
                        "launcher.accelerate_config=launch/accelerate/zero3.yaml", "launcher.training_processes=1",
                        log=work / "zero3.log")
        emit(f"Wall time {wall:.0f} s (train and eval redone; the rest resumed).")
        emit("")
        rows = stage_table(zero3, sampler)
        emit("")
        sharding = (zero3 / "logs" / "sharding_rank_0.jsonl")
        if sharding.exists():
            emit(f"Rank 0 held: `{sharding.read_text().splitlines()[-1]}`")
        win_rates(zero3)
        if "0/train" not in rows:
            failures.append("the ZeRO-3 run did not redo its training stage")
    except (RuntimeError, OSError) as e:
        failures.append(str(e).splitlines()[0])
        emit(f"FAILED: {e}")

    emit("")
    emit("## Rehearsal of configs/paper_imdb.yaml, round 0 at full counts, ~1B random stand-in")
    emit("")
    shape = LLAMA_1B if not args.smoke else {**LLAMA_1B, "hidden_size": 128, "intermediate_size": 256,
                                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
    stand_in = build_stand_in(work / "stand_in", sft, shape)
    rehearsal = work / "rehearsal"
    counts = [] if not args.smoke else ["acquisition.labels_per_round=8", "acquisition.prompt_factor=2",
                                        "acquisition.pair_factor=2", "data.n_eval=16"]
    try:
        wall = apo_dist("run", "configs/paper_imdb.yaml", "--rehearse", "--stand-in", str(stand_in), "--run-dir",
                        str(rehearsal), "--no-progress", "loop.rounds=1", *counts, log=work / "rehearsal.log")
        emit(f"Wall time {wall:.0f} s. The rehearsal's own report (plan beside measurement):")
        emit("")
        emit("```")
        log = (work / "rehearsal.log").read_text(errors="replace")
        emit(log[log.find("rehearsal of"):].strip() if "rehearsal of" in log else log[-4000:])
        emit("```")
        emit("")
        stage_table(rehearsal, sampler)
    except RuntimeError as e:
        failures.append(str(e).splitlines()[0])
        emit(f"FAILED: {e}")

    sampler.stop()
    emit("")
    emit("## Verdict")
    emit("")
    emit("\n".join(f"- {f}" for f in failures) if failures else "- every step ran; see the tables above")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(LINES) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
