"""Shared fixtures: a tiny Llama with a tokenizer trained on the fly, and a prompt file.

The model is random (2 layers, hidden 128, 2 heads of dim 64: the head size vLLM's CPU kernels
accept), so tests are fast and need nothing from a hub.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the movie film story plot actor actress scene director was is a an and but not very "
         "good bad great terrible wonderful awful boring funny sad happy love hate best worst "
         "beautiful ugly slow fast brilliant dull charming weak strong moving silly smart "
         "script music ending characters performance cast some all too quite really never always").split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_sentences(2000), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 2-layer Llama + tokenizer folder, loadable by transformers (and vLLM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=256, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        for s in make_sentences(600, seed=1):
            f.write(json.dumps({"text": " ".join(s.split()[:5])}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_overrides(tiny_model_dir, prompt_file) -> list[str]:
    """Config overrides for a fast end-to-end run on the tiny model."""
    return [f"model.policy={tiny_model_dir}", "data.source=file", f"data.path={prompt_file}",
            "data.n_eval=24", "generation.max_new_tokens=6", "acquisition.labels_per_round=8",
            "acquisition.prompt_factor=2", "acquisition.pair_factor=2", "scoring.entropy_samples=3",
            "training.epochs=1", "training.batch_size=4", "training.micro_batch_size=2",
            "training.lr=1e-3", "loop.rounds=2", "loop.num_threads=1"]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, tiny_model_dir):
    """ONE real vLLM server (fp32) on the tiny model for the whole session, stopped at the end."""
    from apo_dist.generation.vllm_engine import vllm_support
    from apo_dist.config import VLLMConfig
    from apo_dist.generation.vllm_servers import LocalServers

    usable, why = vllm_support()
    if not usable:
        pytest.skip(why)
    servers = LocalServers(1, tmp_path_factory.mktemp("vllm_server"), VLLMConfig(dtype="float32"))
    try:
        servers.start(str(tiny_model_dir))
        yield servers
    finally:
        servers.stop()


# ---- PostgreSQL label stores ----

@pytest.fixture(scope="session")
def postgres_server():
    """ONE PostgreSQL server for the session (launch/postgres.sh up, which installs postgresql if
    missing), stopped at the end; yields its URL. Its folder is not under pytest's temp folder, which
    the `postgres` user (the server's, when we are root) cannot enter."""
    import shutil
    import subprocess
    import tempfile

    from apo_dist.util import free_port

    script = Path(__file__).resolve().parent.parent / "launch" / "postgres.sh"
    folder = tempfile.mkdtemp(prefix="apo-pg-")
    try:
        up = subprocess.run(["bash", str(script), "up", folder, str(free_port())], capture_output=True, text=True,
                            timeout=600)
        if up.returncode:
            pytest.fail(f"launch/postgres.sh up failed:\n{up.stderr}")
        yield up.stdout.split()[-1]
    finally:
        subprocess.run(["bash", str(script), "down", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The server's URL with a new, empty schema first on the search path: no test sees another's rows."""
    import uuid

    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_server}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path) -> str:
    """Where a label store test keeps its store: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.sqlite")
    return request.getfixturevalue("postgres_url")
