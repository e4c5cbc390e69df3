"""The coordinator: a small state machine over the run directory.

Run-level stages (once):   prompts -> eval_reference
Per round r:               pool -> [entropy_samples] -> entropy -> samples -> scores
                           -> acquired -> labels -> train -> eval

Each stage reads tables written by earlier stages, writes its own, then a manifest (sizes, hashes,
and the digests of the upstream manifests it used). On every start the coordinator walks the
stages in order and skips those whose manifest still holds; anything missing, truncated, edited
or computed from different inputs is redone, and so is everything downstream of it. Oracle
answers live in labels.sqlite and are never requested twice, even when a stage is redone.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from omegaconf import DictConfig

from . import acquisition, assets, config as config_mod
from .evaluation import win_rate
from .generation import SamplingParams, make_backend
from .distributed import sharding_report, zero3_inference_model, zero_stage
from .models import DTYPES, format_prompt, load_model, load_tokenizer
from .oracle import LabelStore, make_oracle
from .rundir import RunDir, atomic_write_json, atomic_write_text, read_table, write_table
from .scoring import pair_table, prompt_entropy, sequence_logprobs
from .launcher import StageFailed
from .training import TrainingStopped, train_dpo

log = logging.getLogger("apo_dist.loop")

FAULT_ENV = "APO_DIST_FAULT"  # test hook: "<round>:<stage>:<point>[@rank]" kills the process there
HOLD_ENV = "APO_DIST_HOLD"  # test hook: "<round>:<stage>:<point>=FILE" waits there while FILE exists (once)


class ResumeRefused(RuntimeError):
    """The run directory holds a run made with a config that differs in a result-changing way."""


class Preempted(RuntimeError):
    """A stop was requested (the SLURM warning signal); the run stopped at a safe point."""


class BudgetExhausted(RuntimeError):
    """A label or cost budget (oracle.max_labels / oracle.max_cost) stopped the run at a stage boundary."""


@dataclass
class Stage:
    name: str
    outputs: list[str]
    inputs: dict[str, tuple[Path, str]]  # label -> (scope, stage) whose manifest digest it uses
    run: Callable[[], dict]


def fault_point(round_: int | str, stage: str, point: str) -> None:
    """Test hook: SIGKILL this process where APO_DIST_FAULT names this point ("@K": on rank K only)."""
    fault = os.environ.get(FAULT_ENV, "")
    where, _, rank = fault.partition("@")
    if where == f"{round_}:{stage}:{point}" and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    where, _, hold = os.environ.get(HOLD_ENV, "").partition("=")
    if where == f"{round_}:{stage}:{point}" and not os.path.exists(hold + ".done"):
        Path(hold + ".done").touch()
        Path(hold).touch()
        while os.path.exists(hold):
            time.sleep(0.2)


def stage_seed(seed: int, round_: int, stage: str) -> int:
    return zlib.crc32(f"{seed}/{round_}/{stage}".encode())


class Coordinator:
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, progress: bool = True,
                 echo: Callable[[str], None] = print, worker: bool = False):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.progress = progress
        self.echo = echo
        self.worker = worker  # one rank of a stage under `accelerate launch` (see worker.py)
        self.cache = assets.cache_dir(cfg.assets_dir)
        self._model: tuple[str, object] | None = None
        self._backend = None
        self._store: LabelStore | None = None

    # --- setup -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Write config.yaml for a new run; refuse a resumed run whose config changes results."""
        if not self.worker:
            self.check_and_write_config()
        if self.cfg.loop.num_threads:
            torch.set_num_threads(self.cfg.loop.num_threads)
        self.reference_path = assets.resolve_model_path(self.cfg.model.reference or self.cfg.model.policy, self.cache)
        self.sft_path = assets.resolve_model_path(self.cfg.model.policy, self.cache)
        self.tokenizer = load_tokenizer(self.sft_path)

    def check_and_write_config(self) -> None:
        self.rd.root.mkdir(parents=True, exist_ok=True)
        if self.rd.config_path.exists():
            old = config_mod.from_yaml_text(self.rd.config_path.read_text())
            diffs = config_mod.changed_keys(old, self.cfg)
            if diffs:
                lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
                raise ResumeRefused(
                    f"{self.rd.root} was started with a different config; resuming would mix results.\n"
                    f"{lines}\nUse a new --run-dir, or revert these keys.")
        atomic_write_text(self.rd.config_path, config_mod.to_yaml(self.cfg))
        for section in (self.cfg.oracle, self.cfg.eval.oracle):  # an unavailable oracle fails now
            if section is not None:
                make_oracle(section, self.cfg.seed)

    @property
    def store(self) -> LabelStore:
        if self._store is None:
            self._store = LabelStore(self.cfg.oracle.store or self.rd.labels_db)
        return self._store

    @property
    def run_id(self) -> str:
        """Who paid for an answer in the label store (budgets count this run's answers only)."""
        return str(self.rd.root.resolve())

    def check_budget(self, round_: int | str, stage: str) -> None:
        """Raise BudgetExhausted before a stage that would spend past oracle.max_labels / max_cost.

        Cost is checked before each round and each oracle stage (labels, eval); labels before
        each round, which must fit whole: a run never holds more than max_labels labels.
        """
        o = self.cfg.oracle
        if o.max_cost and stage in ("pool", "labels", "eval"):
            spent = self.store.totals(run=self.run_id)["cost"]
            if spent >= o.max_cost:
                raise BudgetExhausted(f"cost budget reached: ${spent:.4f} spent on oracle answers, "
                                      f"oracle.max_cost={o.max_cost}")
        if o.max_labels and stage == "pool":
            have = sum(len(read_table(self.rd.round_dir(q) / "labels.parquet")) for q in range(int(round_)))
            if have + self.cfg.acquisition.labels_per_round > o.max_labels:
                raise BudgetExhausted(f"label budget reached: {have} labels so far, round {round_} would add "
                                      f"{self.cfg.acquisition.labels_per_round}, oracle.max_labels={o.max_labels}")

    def model(self, path: str):
        """The model at `path`, loaded once per stage sequence (one model held at a time).

        Under a multi-process ZeRO-3 launch the model is partitioned across ranks."""
        if self._model is None or self._model[0] != path:
            self._model = None
            state = PartialState()
            if state.num_processes > 1 and zero_stage() == 3:
                model = zero3_inference_model(path, DTYPES[self.cfg.model.dtype], state.num_processes)
            else:
                model = load_model(path, self.cfg.model.dtype)
            if self.worker:
                self.log_sharding(path, sharding_report(model))
            self._model = (path, model)
        return self._model[1]

    def log_sharding(self, path: str, report: dict) -> None:
        """Per rank: how much of each model it holds (logs/sharding_rank_K.jsonl)."""
        state = PartialState()
        logs = self.rd.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"sharding_rank_{state.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"model": path, "world": state.num_processes, **report}) + "\n")

    @property
    def is_main(self) -> bool:
        return PartialState().is_main_process

    def write(self, path: Path, table: pd.DataFrame) -> None:
        """Write a stage table (on rank 0 only when running as one rank of many)."""
        if self.is_main:
            write_table(path, table)

    def policy_path(self, r: int) -> str:
        return self.sft_path if r == 0 else str(self.rd.round_dir(r - 1) / "policy")

    # --- the state machine -----------------------------------------------------------------
    def run(self) -> list[dict]:
        self.prepare()
        self.rd.stop_path.unlink(missing_ok=True)  # a request made to an earlier process of this run
        try:
            return self._run()
        except BudgetExhausted as e:
            self.rd.update_state(status="stopped", reason=str(e))
            raise
        except Preempted as e:
            self.rd.update_state(status="preempted", reason=str(e))
            raise
        finally:
            if self._backend is not None:
                self._backend.close()

    def _run(self) -> list[dict]:
        self.rd.update_state(status="running", reason="")
        root = self.rd.root
        for stage in (self.stage_prompts(), self.stage_eval_reference()):
            self.ensure(root, "run", stage)
        results = []
        for r in range(self.cfg.loop.rounds):
            t0 = time.time()
            for stage in self.round_stages(r):
                self.ensure(self.rd.round_dir(r), r, stage)
            results.append(self.round_summary(r, time.time() - t0))
        self.rd.update_state(status="done", round=self.cfg.loop.rounds - 1, stage="eval")
        from .report import write_report

        write_report(self.rd.root)
        self.echo(f"report: {self.rd.root / 'report.md'}")
        return results

    def check_stop(self, where: str) -> None:
        if self.rd.stop_path.exists():
            raise Preempted(f"{self.rd.stop_path.read_text() or 'stop requested'}; stopped {where}")

    def ensure(self, scope: Path, round_: int | str, stage: Stage) -> None:
        inputs = {label: self.rd.manifest_digest(s, name) for label, (s, name) in stage.inputs.items()}
        why = self.rd.check_manifest(scope, stage.name, inputs)
        if why is None:
            return
        self.check_stop(f"before round {round_} {stage.name}")
        if why != "not done":
            log.warning("redoing %s/%s: %s", scope.name, stage.name, why)
        self.check_budget(round_, stage.name)
        self.rd.clear_stage(scope, stage.name, stage.outputs)
        self.rd.update_state(round=round_, stage=stage.name, stage_status="running")
        fault_point(round_, stage.name, "start")
        t0 = time.time()
        processes = self.launched_processes(stage.name)
        try:
            metrics = self.launch(stage.name, round_, processes) if processes else (stage.run() or {})
        except (TrainingStopped, StageFailed):
            self.check_stop(f"in round {round_} {stage.name} (checkpointed)")  # a launched stage's ranks stopped
            raise
        fault_point(round_, stage.name, "end")
        self.rd.write_manifest(scope, stage.name, stage.outputs, inputs)
        self.rd.log_metrics({"round": round_, "stage": stage.name, "seconds": round(time.time() - t0, 3), **metrics})
        self.rd.update_state(round=round_, stage=stage.name, stage_status="done")

    def launched_processes(self, stage: str) -> int:
        """Processes for `stage` under `accelerate launch`, or 0 to run it in this process."""
        launcher = self.cfg.launcher
        if stage == "entropy" and self.cfg.acquisition.function not in ("entropy", "hybrid"):
            return 0  # no model involved
        k = {"entropy": launcher.scoring_processes, "scores": launcher.scoring_processes,
             "train": launcher.training_processes}.get(stage, 0)
        return k if k and (k > 1 or launcher.accelerate_config) else 0

    def launch(self, stage: str, r: int, processes: int) -> dict:
        from .launcher import launch_stage

        return launch_stage(self.cfg, self.rd, stage, r, processes)

    def stage_function(self, name: str, r: int) -> Callable[[], dict]:
        return next(s.run for s in self.round_stages(r) if s.name == name)

    def round_stages(self, r: int) -> list[Stage]:
        rd, root = self.rd.round_dir(r), self.rd.root
        policy = {"policy": (self.rd.round_dir(r - 1), "train")} if r > 0 else {}
        earlier = {f"{stage}_{q}": (self.rd.round_dir(q), stage) for q in range(r) for stage in ("acquired", "labels")}
        uses_entropy = self.cfg.acquisition.function in ("entropy", "hybrid")
        stages = [Stage("pool", ["pool.parquet"], {"prompts": (root, "prompts"), **earlier},
                        lambda: self.make_pool(r))]
        if uses_entropy:
            stages.append(Stage("entropy_samples", ["entropy_samples.parquet"],
                                {"pool": (rd, "pool"), **policy}, lambda: self.make_entropy_samples(r)))
        stages += [
            Stage("entropy", ["entropy.parquet"],
                  {"pool": (rd, "entropy_samples" if uses_entropy else "pool"), **policy},
                  lambda: self.make_entropy(r)),
            Stage("samples", ["samples.parquet"], {"entropy": (rd, "entropy"), **policy},
                  lambda: self.make_samples(r)),
            Stage("scores", ["scores.parquet"], {"samples": (rd, "samples"), **policy},
                  lambda: self.make_scores(r)),
            Stage("acquired", ["acquired.parquet"], {"scores": (rd, "scores")},
                  lambda: self.make_acquired(r)),
            Stage("labels", ["labels.parquet"], {"acquired": (rd, "acquired")},
                  lambda: self.make_labels(r)),
            Stage("train", ["policy", "train_log.jsonl"],
                  {**{f"labels_{q}": (self.rd.round_dir(q), "labels") for q in range(r + 1)},
                   **(policy if self.cfg.training.init == "previous" else {})},
                  lambda: self.make_policy(r)),
            Stage("eval", ["eval.json", "eval_samples.parquet"],
                  {"policy": (rd, "train"), "reference": (root, "eval_reference")},
                  lambda: self.make_eval(r)),
        ]
        return stages

    # --- run-level stages ------------------------------------------------------------------
    def stage_prompts(self) -> Stage:
        return Stage("prompts", ["prompts.parquet"], {}, self.make_prompts)

    def make_prompts(self) -> dict:
        from .data import load_prompts

        train, evals, report = load_prompts(self.cfg, self.tokenizer)
        config_mod.check_pool_size(self.cfg, len(train))
        table = pd.concat([train.assign(split="train"), evals.assign(split="eval")], ignore_index=True)
        table["prompt_ids"] = [format_prompt(self.tokenizer, p, self.cfg.data.instruction,
                                             self.cfg.model.use_chat_template) for p in table["prompt"]]
        write_table(self.rd.root / "prompts.parquet", table)
        return report

    def prompts(self, split: str) -> pd.DataFrame:
        table = read_table(self.rd.root / "prompts.parquet")
        return table[table["split"] == split].reset_index(drop=True)

    def stage_eval_reference(self) -> Stage:
        out = self.rd.root / "eval_reference.parquet"
        make = (self.make_dataset_reference if self.cfg.eval.reference == "dataset"
                else lambda: self.make_eval_completions(self.sft_path, out, "eval_reference"))
        return Stage("eval_reference", ["eval_reference.parquet"], {"prompts": (self.rd.root, "prompts")}, make)

    def make_dataset_reference(self) -> dict:
        """eval_reference.parquet from the data's own references (eval.reference=dataset): no generation."""
        prompts = self.prompts("eval")
        token_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts["reference"]]
        table = prompts[["prompt_id", "prompt", "prompt_ids"]].assign(
            sample=0, token_ids=token_ids, token_logprobs=None, completion=prompts["reference"],
            finish_reason="reference")
        write_table(self.rd.root / "eval_reference.parquet", table)
        return {"completions": len(table), "what": "eval_reference", "reference": "dataset"}

    def make_eval_completions(self, model_path: str, out: Path, what: str) -> dict:
        prompts = self.prompts("eval")
        gen = self.cfg.generation
        params = SamplingParams(n=1, temperature=self.cfg.eval.temperature, top_p=gen.top_p, top_k=gen.top_k,
                                max_new_tokens=gen.max_new_tokens, fixed_length=gen.fixed_length,
                                seed=stage_seed(self.cfg.seed, 0, "eval"))
        table = self.generate(model_path, prompts, params)
        write_table(out, table)
        return {"completions": len(table), "what": what}

    # --- round stages ----------------------------------------------------------------------
    def make_pool(self, r: int) -> dict:
        train = self.prompts("train")
        used = set()
        for q in range(r):
            used |= set(read_table(self.rd.round_dir(q) / "acquired.parquet")["prompt_id"])
            used |= set(read_table(self.rd.round_dir(q) / "labels.parquet")["prompt_id"])  # replacements
        available = train[~train["prompt_id"].isin(used)]
        need = config_mod.candidate_prompts_per_round(self.cfg)
        if need > len(available):
            raise RuntimeError(f"round {r} needs {need} unused training prompts but only {len(available)} "
                               f"remain; use fewer rounds, fewer labels per round or a larger pool")
        rng = np.random.default_rng(stage_seed(self.cfg.seed, r, "pool"))
        pool = available.iloc[np.sort(rng.choice(len(available), size=need, replace=False))]
        write_table(self.rd.round_dir(r) / "pool.parquet", pool[["prompt_id", "prompt", "prompt_ids"]])
        return {"prompts": need, "available": len(available)}

    def make_entropy_samples(self, r: int) -> dict:
        pool = read_table(self.rd.round_dir(r) / "pool.parquet")
        gen = self.cfg.generation
        params = SamplingParams(n=self.cfg.scoring.entropy_samples, temperature=gen.entropy_temperature,
                                max_new_tokens=gen.max_new_tokens, fixed_length=gen.fixed_length,
                                seed=stage_seed(self.cfg.seed, r, "entropy_samples"))
        samples = self.generate(self.policy_path(r), pool, params)
        write_table(self.rd.round_dir(r) / "entropy_samples.parquet", samples)
        return {"samples": len(samples)}

    def make_entropy(self, r: int) -> dict:
        rd = self.rd.round_dir(r)
        a = self.cfg.acquisition
        if a.function in ("entropy", "hybrid"):
            samples = read_table(rd / "entropy_samples.parquet")
            token = self.cfg.scoring.entropy_estimator == "token"
            if self.cfg.scoring.entropy_from_generation and not token:
                scored = pd.DataFrame({"logp": [float(np.sum(lp)) for lp in samples["token_logprobs"]]})
            else:
                scored = self.logprobs(self.policy_path(r), samples, with_entropy=token, desc="score entropy",
                                       shard_dir=rd / "shards" / "entropy")
            table = prompt_entropy(pd.concat([samples, scored], axis=1), self.cfg.scoring.entropy_estimator)
        else:
            pool = read_table(rd / "pool.parquet")
            table = pd.DataFrame({"prompt_id": pool["prompt_id"], "entropy": np.nan, "n_samples": 0})
        rng = np.random.default_rng(stage_seed(self.cfg.seed, r, "entropy"))
        table = acquisition.select_prompts(table, a.function, a.labels_per_round, a.pair_factor, rng)
        self.write(rd / "entropy.parquet", table)
        return {"prompts": len(table), "selected": int(table["selected"].sum()),
                "mean_entropy": float(table["entropy"].mean()) if table["entropy"].notna().any() else None}

    def make_samples(self, r: int) -> dict:
        rd = self.rd.round_dir(r)
        pool = read_table(rd / "pool.parquet")
        chosen = read_table(rd / "entropy.parquet").query("selected")["prompt_id"]
        prompts = pool[pool["prompt_id"].isin(chosen)].reset_index(drop=True)
        gen = self.cfg.generation
        params = SamplingParams(n=2, temperature=gen.pair_temperature, top_p=gen.top_p, top_k=gen.top_k,
                                max_new_tokens=gen.max_new_tokens, fixed_length=gen.fixed_length,
                                seed=stage_seed(self.cfg.seed, r, "samples"))
        samples = self.generate(self.policy_path(r), prompts, params)
        write_table(rd / "samples.parquet", samples)
        return {"samples": len(samples)}

    def make_scores(self, r: int) -> dict:
        rd = self.rd.round_dir(r)
        samples = read_table(rd / "samples.parquet")
        samples["policy_logp"] = self.logprobs(self.policy_path(r), samples, desc="score policy",
                                               shard_dir=rd / "shards" / "policy")["logp"].values
        if self.policy_path(r) == self.reference_path:
            samples["ref_logp"] = samples["policy_logp"]
        else:
            samples["ref_logp"] = self.logprobs(self.reference_path, samples, desc="score reference",
                                                shard_dir=rd / "shards" / "reference")["logp"].values
        pairs = pair_table(samples, self.cfg.training.beta)
        self.write(rd / "scores.parquet", pairs)
        return {"pairs": len(pairs), "mean_certainty": float(pairs["certainty"].mean())}

    def select_pairs(self, r: int, exclude: set | None = None) -> pd.DataFrame:
        """The round's seeded choice of pairs from scores.parquet, leaving out `exclude`."""
        a = self.cfg.acquisition
        rng = np.random.default_rng(stage_seed(self.cfg.seed, r, "acquired"))
        return acquisition.select_pairs(read_table(self.rd.round_dir(r) / "scores.parquet"), a.function,
                                        a.labels_per_round, rng, exclude=exclude)

    def make_acquired(self, r: int) -> dict:
        rd = self.rd.round_dir(r)
        a = self.cfg.acquisition
        chosen = self.select_pairs(r)
        if len(chosen) < a.labels_per_round:
            raise RuntimeError(f"round {r}: only {len(chosen)} candidate pairs for {a.labels_per_round} labels")
        write_table(rd / "acquired.parquet", chosen)
        return {"pairs": len(chosen), "mean_certainty": float(chosen["certainty"].mean())}

    def make_labels(self, r: int) -> dict:
        """Label the acquired pairs; an unlabelable pair is replaced by the next best candidate."""
        rd = self.rd.round_dir(r)
        a = self.cfg.acquisition
        pairs = read_table(rd / "acquired.parquet")
        oracle = make_oracle(self.cfg.oracle, self.cfg.seed)
        labelled, excluded, asked, reasons = [], set(), 0, Counter()
        while len(pairs):
            labels, new = self.store.label(oracle, list(pairs["prompt"]), list(pairs["completion_a"]),
                                           list(pairs["completion_b"]), batch_size=self.cfg.oracle.batch_size,
                                           progress=self.progress, run=self.run_id,
                                           on_batch=lambda: self.labels_batch_done(r))
            asked += new
            pairs = pairs.assign(label=labels)
            labelled.append(pairs[pairs["label"].notna()])
            failed = pairs[pairs["label"].isna()]
            if failed.empty:
                break
            excluded |= set(failed["pair_id"])
            reasons += self.store.reasons(oracle.identity, list(failed["prompt"]), list(failed["completion_a"]),
                                          list(failed["completion_b"]))
            chosen = self.select_pairs(r, exclude=excluded)  # the acquired stage's ranking, minus these
            done = set(pd.concat(labelled)["pair_id"])
            pairs = chosen[~chosen["pair_id"].isin(done)].reset_index(drop=True)
        table = pd.concat(labelled, ignore_index=True)
        if table.empty:
            raise RuntimeError(f"round {r}: the oracle could label none of {len(excluded)} candidate pairs "
                               f"({dict(reasons)})")
        write_table(rd / "labels.parquet", table)
        shortfall = a.labels_per_round - len(table)
        if shortfall:
            log.warning("round %d: %d labels instead of %d: %d candidate pairs were unlabelable and no "
                        "candidates are left to replace them (raise acquisition.pair_factor)",
                        r, len(table), a.labels_per_round, len(excluded))
        return {"labels": len(table), "unlabelable": len(excluded), "shortfall": shortfall,
                "unlabelable_reasons": dict(reasons), "oracle_requests": asked,
                "from_store": len(table) + len(excluded) - asked, "tie_rate": float((table["label"] == 0.5).mean())}

    def labels_batch_done(self, r: int) -> None:
        """Answers of a batch are committed: a safe point to stop."""
        fault_point(r, "labels", "mid")
        self.check_stop(f"in round {r} labels (answers so far are stored)")

    def make_policy(self, r: int) -> dict:
        pairs = pd.concat([read_table(self.rd.round_dir(q) / "labels.parquet") for q in range(r + 1)],
                          ignore_index=True)
        init = self.sft_path if self.cfg.training.init == "sft" else self.policy_path(r)
        self._model = None  # free memory before training
        tb = str(self.rd.root / "tensorboard" / f"round_{r:04d}") if self.cfg.loop.tensorboard else None
        # A checkpoint is reused only by a restart on the same labels and starting weights.
        resume_key = json.dumps([init, [self.rd.manifest_digest(self.rd.round_dir(q), "labels") for q in range(r + 1)]])
        result = train_dpo(pairs, init, self.rd.round_dir(r) / "policy", self.cfg.training,
                           seed=stage_seed(self.cfg.seed, r, "train"), progress=self.progress,
                           tensorboard_dir=tb, checkpoint_dir=self.rd.round_dir(r) / "train_checkpoint",
                           resume_key=resume_key, on_step=lambda step: fault_point(r, "train", f"step{step}"),
                           stop_file=self.rd.stop_path)
        if self.worker:
            self.log_sharding(f"{init} (training)", result.sharding)
        if self.is_main:
            atomic_write_text(self.rd.round_dir(r) / "train_log.jsonl",
                              "".join(json.dumps(h) + "\n" for h in result.history))
        last = result.history[-1]
        return {"pairs": len(pairs), "steps": result.steps, "train_seconds": round(result.seconds, 2),
                "pairs_per_second": round(len(pairs) * self.cfg.training.epochs / result.seconds, 3),
                "final_loss": last["loss"], "final_reward_accuracy": last["reward_accuracy"]}

    def make_eval(self, r: int) -> dict:
        rd = self.rd.round_dir(r)
        self.make_eval_completions(str(rd / "policy"), rd / "eval_samples.parquet", "policy")
        policy = read_table(rd / "eval_samples.parquet")
        reference = read_table(self.rd.root / "eval_reference.parquet")
        judge_cfg = self.cfg.eval.oracle or self.cfg.oracle
        oracle = make_oracle(judge_cfg, self.cfg.seed, deterministic=True)
        outcomes, asked = self.store.label(oracle, list(policy["prompt"]), list(policy["completion"]),
                                           list(reference["completion"]), batch_size=judge_cfg.batch_size,
                                           progress=self.progress, desc="judge", run=self.run_id)
        judged = [x for x in outcomes if not np.isnan(x)]
        if not judged:
            raise RuntimeError(f"round {r}: the eval judge could not judge any of {len(outcomes)} eval pairs")
        result = win_rate(judged)
        result["unlabelable"] = len(outcomes) - len(judged)
        labels_so_far = sum(len(read_table(self.rd.round_dir(q) / "labels.parquet")) for q in range(r + 1))
        result.update(round=r, labels=labels_so_far, oracle_requests=asked)
        atomic_write_json(rd / "eval.json", result)
        return result

    # --- helpers ---------------------------------------------------------------------------
    def generate(self, model_path: str, prompts: pd.DataFrame, params: SamplingParams) -> pd.DataFrame:
        """Completions for every row of `prompts` (prompt_id, prompt, prompt_ids), one row each."""
        if self._backend is None:
            self._backend = make_backend(self.cfg, self.model, self.tokenizer, self.rd.root, progress=self.progress)
        out = self._backend.generate(model_path, [list(p) for p in prompts["prompt_ids"]], params)
        meta = prompts.iloc[out["prompt_index"].values].reset_index(drop=True)
        return pd.concat([meta[["prompt_id", "prompt", "prompt_ids"]], out.drop(columns="prompt_index")], axis=1)

    def logprobs(self, model_path: str, samples: pd.DataFrame, with_entropy: bool = False,
                 desc: str = "score", shard_dir: Path | None = None) -> pd.DataFrame:
        return sequence_logprobs(self.model(model_path), [list(p) for p in samples["prompt_ids"]],
                                 [list(t) for t in samples["token_ids"]], self.tokenizer.pad_token_id,
                                 self.cfg.scoring.batch_size, with_entropy, desc, self.progress, shard_dir)

    def round_summary(self, r: int, seconds: float) -> dict:
        result = json.loads((self.rd.round_dir(r) / "eval.json").read_text())
        self.echo(f"round {r}: labels {result['labels']:4d} | win-rate {result['win_rate']:.3f} "
                  f"± {result['stderr']:.3f} (n={result['n']}, ties {result['tie_rate']:.2f}) | {seconds:.0f} s")
        return result
