"""A pool of vLLM OpenAI-compatible servers: their lifecycle, and a client that generates with them.

`LocalServers` starts K servers on this machine (free ports, one log file each, /health wait,
process groups stopped on exit, SIGINT/SIGTERM, and with the parent's death), with the engine
options of the `generation.vllm` section. The same code runs on a generation node as
`python -m apo_dist.generation.vllm_servers serve --model DIR --num K --workdir D [--dtype ...]`
(one flag per engine option of that section, `serve_args`), which prints the servers' base URLs
and keeps them up until it is signalled.

`ServerPool` is the `vllm_server` generation backend: each prompt is one /v1/completions request
(its token ids as the prompt, `n` samples, a seed derived from the stage seed and the prompt index),
sent to the live server with the fewest requests in flight, with bounded concurrency. A failed
request is retried with exponential backoff; a server that stops answering /health leaves the pool
and its requests go to the others. A local server that died is restarted in the background (after
a backoff, on the policy the pool serves by then, at most `max_restarts` times; `restarts` counts
them) and rejoins once it passes the probe; a given server, or a local one out of restarts, stays
out. When the policy changes, every server reloads the new full weights in place (POST
/collective_rpc reload_weights), or for a LoRA policy keeps its base weights and loads the adapter
(POST /v1/load_lora_adapter, then unloads the last one; requests name the adapter as their model);
a local server is restarted when that fails, and every server must pass the weight probe before it
generates. Servers of a LoRA run are started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING
(`serve --max-lora-rank`).
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import httpx
import pandas as pd
import torch
from tqdm import tqdm

from ..calls import backoff_delay
from ..config import ModelConfig, VLLMConfig
from ..util import die_with_parent, free_port, log_tail, stop_group
from .base import SamplingParams, completion_row
from .vllm_worker import EXTENSION, RELOAD_METHOD
from .vllm_engine import (Policy, Probe, StaleWeightsError, adapter_rank, cpu_ranges, eager, engine_dtype, gpu_groups,
                          probe_tolerance, request_seed, vllm_env, vllm_lora_rank, vllm_sampling)

log = logging.getLogger("apo_dist.generation.vllm_servers")

SERVED_NAME = "policy"  # the model name local servers answer to, whatever checkpoint they hold


class ServerStartError(RuntimeError):
    """A vLLM server did not come up; the message carries the end of its log."""


class AdapterLoadError(RuntimeError):
    """A vLLM server refused a LoRA adapter; the message says how a server must be started to take one."""


def root_url(url: str) -> str:
    """http://host:port for an OpenAI base URL http://host:port/v1."""
    return url.rstrip("/").removesuffix("/v1")


# The fields of the generation.vllm section a server needs (the weight probe runs in the coordinator).
SERVER_OPTIONS = tuple(f.name for f in fields(VLLMConfig) if f.name != "probe_tolerance")


def serve_args(vllm, dtype: str | None = None, lora_rank: int = 0) -> list[str]:
    """The `generation.vllm` section as `python -m apo_dist.generation.vllm_servers serve` flags, with
    the engine dtype resolved (`dtype`: model.dtype, used where generation.vllm.dtype is null), and
    for a LoRA run (`lora_rank`: training.lora.rank > 0) the rank of the adapters to serve."""
    values = {name: getattr(vllm, name) for name in SERVER_OPTIONS} | {"dtype": engine_dtype(vllm, dtype)}
    values["max_lora_rank"] = lora_rank or None
    return [a for name, value in values.items() if value is not None  # None: the serving node decides
            for a in (f"--{name.replace('_', '-')}", str(value))]


def vllm_server_args(vllm, dtype: str | None = None, lora_rank: int = 0) -> list[str]:
    """The `generation.vllm` section as flags of vLLM's OpenAI-compatible server, with LoRA enabled for
    adapters of rank `lora_rank` (training.lora.rank; 0: LoRA off)."""
    lora = ["--enable-lora", "--max-lora-rank", str(vllm_lora_rank(lora_rank))] if lora_rank > 0 else []
    return [*lora, "--dtype", engine_dtype(vllm, dtype),
            *(["--max-model-len", str(vllm.max_model_len)] if vllm.max_model_len else []),
            "--tensor-parallel-size", str(vllm.tensor_parallel_size),
            "--gpu-memory-utilization", str(vllm.gpu_memory_utilization), "--seed", str(vllm.seed),
            *(["--max-num-seqs", str(vllm.max_num_seqs)] if vllm.max_num_seqs else []),
            *([] if vllm.prefix_caching else ["--no-enable-prefix-caching"]),
            "--logprobs-mode", "raw_logprobs", "--worker-extension-cls", EXTENSION,
            "--disable-uvicorn-access-log", "--disable-log-stats",
            *(["--enforce-eager"] if eager(vllm) else [])]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _wait_until_group_gone(pgid: int, timeout: float = 30) -> None:
    """SIGKILL is delivered at once but a big process takes a moment to exit: wait for it."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


class LocalServers:
    """K vLLM servers on this machine, each in its own process group, logging to <workdir>/servers/.

    `vllm`: the `generation.vllm` section (a VLLMConfig or its DictConfig node); `dtype`: model.dtype,
    the servers' dtype where generation.vllm.dtype is null; `lora_rank`: training.lora.rank (> 0: the
    servers start able to load adapters of that rank at runtime).
    """

    def __init__(self, num: int, workdir: Path, vllm, dtype: str | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 600, lora_rank: int = 0):
        self.num = num
        self.dir = Path(workdir) / "servers"
        self.vllm = vllm
        self.server_args = vllm_server_args(vllm, dtype, lora_rank)  # fails here, not in a server, without a dtype
        self.lora_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if lora_rank > 0 else {}
        self.host = host
        self.startup_timeout = startup_timeout
        self.procs: list[subprocess.Popen | None] = [None] * num
        self.ports = [0] * num
        self.cpus = cpu_ranges(num)
        self.gpus = gpu_groups(num, vllm.tensor_parallel_size, torch.cuda.device_count())
        self._hooked = False
        self._lock = threading.Lock()  # a spawn from another thread vs stop()
        self._stopped = False

    @property
    def urls(self) -> list[str]:
        if self.host == "0.0.0.0":  # reachable from other nodes: advertise this node's name
            host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        else:
            host = self.host
        return [f"http://{host}:{p}/v1" for p in self.ports]

    def log_path(self, i: int) -> Path:
        return self.dir / f"server_{i}.log"

    def start(self, model_path: str) -> list[str]:
        """Start all servers on `model_path` and wait until each answers /health."""
        self._hook_exit()
        for i in range(self.num):
            self._spawn(i, model_path)
        for i in range(self.num):
            self._wait(i)
        return self.urls

    def restart(self, i: int, model_path: str) -> None:
        self._kill(i)
        self._spawn(i, model_path)
        self._wait(i)

    def _spawn(self, i: int, model_path: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports[i] = free_port()
        env = {**os.environ, **vllm_env(self.dir / "cache", self.vllm.kv_cache_gb, self.cpus[i]), **self.lora_env}
        if self.gpus[i] is not None:  # each server on its own GPUs
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[i]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--served-model-name", SERVED_NAME, "--host", self.host, "--port", str(self.ports[i]),
               *self.server_args]
        with open(self.log_path(i), "ab") as logf, self._lock:
            if self._stopped:
                raise ServerStartError(f"vLLM server {i} not started: the servers are stopped")
            logf.write(f"\n$ {' '.join(cmd)}\n".encode())
            logf.flush()
            self.procs[i] = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=die_with_parent)
        log.info("vLLM server %d starting on port %d (pid %d, log %s)", i, self.ports[i], self.procs[i].pid,
                 self.log_path(i))

    def _wait(self, i: int) -> None:
        proc, url = self.procs[i], f"{root_url(self.urls[i])}/health"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerStartError(f"vLLM server {i} exited with code {proc.returncode} while starting; "
                                       f"end of {self.log_path(i)}:\n{log_tail(self.log_path(i))}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self._kill(i)
        raise ServerStartError(f"vLLM server {i} did not answer {url} within {self.startup_timeout:.0f} s; "
                               f"end of {self.log_path(i)}:\n{log_tail(self.log_path(i))}")

    def _kill(self, i: int, grace: float = 15) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace` seconds."""
        proc = self.procs[i]
        if proc is None:
            return
        self.procs[i] = None
        stop_group(proc, grace)
        _wait_until_group_gone(proc.pid)

    def stop(self) -> None:
        """Stop every server, for good: no server starts after this."""
        with self._lock:
            self._stopped = True
        for i in range(self.num):
            self._kill(i)

    def _hook_exit(self) -> None:
        """Stop the servers at interpreter exit, and turn SIGTERM into SystemExit so `finally` runs."""
        if self._hooked:
            return
        self._hooked = True
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_signal)


_terminated_by = 0  # the signal _exit_on_signal received, if any


def _exit_on_signal(signum, frame) -> None:
    global _terminated_by
    _terminated_by = signum
    sys.exit(128 + signum)


@dataclass
class Server:
    url: str
    local_index: int | None = None  # position in LocalServers, for restarts
    alive: bool = True
    policy: Policy | None = None  # what it serves, once probed
    weights: str | None = None  # the full weights it holds (None: unknown)
    adapter: str | None = None  # the LoRA adapter loaded (the model name its requests ask for)
    inflight: int = field(default=0)
    restarts: int = 0  # times this local server was restarted after it died
    restarting: bool = False  # down, and being restarted in the background


class NoServerLeft(RuntimeError):
    pass


class ServerPool:
    """The `vllm_server` backend: generation spread over OpenAI-compatible vLLM servers."""

    def __init__(self, urls: list[str], tokenizer, probe: Probe, model: str = "", concurrency: int = 64,
                 max_retries: int = 5, request_timeout: float = 600, local: LocalServers | None = None,
                 progress: bool = True, max_restarts: int = 3):
        self.servers = [Server(u) for u in urls]  # the local servers join when they are started
        self.tokenizer = tokenizer
        self.probe = probe
        self.model = model or (SERVED_NAME if local else "")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.local = local
        self.progress = progress
        self.max_restarts = max_restarts  # per local server
        self.restarts = 0  # local servers restarted after they died, all told
        self.policy: Policy | None = None  # what the pool serves: a restarted server comes up on it
        self._lock = threading.Lock()  # policy and rejoining servers, between this and the restart thread
        self._dead: queue.Queue | None = None  # local servers for the restart thread; None: not started yet
        self._closed = threading.Event()

    @classmethod
    def from_config(cls, gen, dtype: str | None, load: Callable[[str], object], tokenizer, workdir: Path,
                    progress: bool = True, lora_rank: int = 0) -> "ServerPool":
        """The pool `gen` (the `generation` section) describes: gen.servers, with gen.vllm for the servers
        started here and the probe; `dtype` is model.dtype (used where generation.vllm.dtype is null);
        `lora_rank` is training.lora.rank (local servers start able to load adapters of that rank)."""
        s = gen.servers
        local = None
        if s.num_local:
            local = LocalServers(s.num_local, workdir, gen.vllm, dtype, startup_timeout=s.startup_timeout,
                                 lora_rank=lora_rank)
        return cls(list(s.urls), tokenizer, Probe(tokenizer, load, probe_tolerance(gen.vllm, dtype)), s.model,
                   s.concurrency, s.max_retries, s.request_timeout, local, progress, s.max_restarts)

    # --- weights ---------------------------------------------------------------------------
    def ensure_weights(self, model_path: str) -> None:
        """Every live server serves `model_path` and passes the probe; dead ones are left out (local ones
        restart on it), a given server that answers again rejoins."""
        policy = Policy.of(model_path)
        with self._lock:  # from now on a restarted server rejoins only on `policy`
            self.policy = policy
        if self.local is not None and all(s.local_index is None for s in self.servers):
            urls = self.local.start(policy.weights)
            self.servers = [Server(u, i, weights=policy.weights) for i, u in enumerate(urls)] + self.servers
        for s in self.servers:
            if s.alive and not self.healthy(s):
                self._lost(s, "no answer to /health")
            elif not s.alive and s.local_index is None and self.healthy(s):
                s.alive, s.policy, s.weights, s.adapter = True, None, None, None  # unknown: reload and probe
        live = [s for s in self.servers if s.alive]
        if not live and not any(s.restarting for s in self.servers):
            raise self._no_server_left()
        if not self.model:
            self.model = httpx.get(f"{live[0].url}/models", timeout=30).json()["data"][0]["id"]
        for s in live:
            if s.policy != policy:
                self.swap(s, policy)

    def swap(self, s: Server, policy: Policy) -> None:
        """Bring server `s` to `policy` (`put`); a local server that fails is restarted on `policy`'s full
        weights and tried again."""
        try:
            self.put(s, policy)
        except (httpx.HTTPError, StaleWeightsError, AdapterLoadError) as e:
            if s.local_index is None:
                if isinstance(e, AdapterLoadError):
                    raise
                raise RuntimeError(f"{s.url}: weight reload failed ({e}); start servers with "
                                   f"`python -m apo_dist.generation.vllm_servers serve` (dev mode and the apo-dist "
                                   f"worker extension) on a path they can read") from e
            log.warning("%s: weight reload failed (%s); restarting it on %s", s.url, e, policy.weights)
            self._restart_on(s, policy.weights)
            self.put(s, policy)

    def put(self, s: Server, policy: Policy) -> None:
        """Make server `s` serve `policy`, then probe: the last adapter unloaded (memory stays bounded),
        full weights reloaded in place where they differ, the policy's adapter loaded."""
        s.policy = None
        if s.adapter is not None and s.adapter != policy.adapter:
            self.unload_adapter(s)
        if s.weights != policy.weights:
            s.weights = None
            self.reload(s, policy.weights)
            s.weights = policy.weights
        if policy.adapter is not None and s.adapter != policy.adapter:
            self.load_adapter(s, policy)
        self.check(s, policy.path)
        s.policy = policy

    def _restart_on(self, s: Server, weights: str) -> None:
        """Restart local server `s` on the full weights `weights` (no adapter loaded)."""
        self.local.restart(s.local_index, weights)
        s.url, s.weights, s.adapter = self.local.urls[s.local_index], weights, None

    def reload(self, s: Server, model_path: str) -> None:
        """In-place weight reload, then drop the prefix cache (its KV came from the old weights)."""
        base = root_url(s.url)
        r = httpx.post(f"{base}/collective_rpc", timeout=self.request_timeout,
                       json={"method": RELOAD_METHOD, "kwargs": {"weights_path": str(model_path)}})
        r.raise_for_status()
        httpx.post(f"{base}/reset_prefix_cache", timeout=self.request_timeout).raise_for_status()

    def load_adapter(self, s: Server, policy: Policy) -> None:
        """Load `policy`'s adapter into server `s` under its name, unless `s` lists it already (a given
        server may, from an earlier coordinator; the name is the files' digest, so the weights are the same).
        Not vLLM's load_inplace: its requests would then reload the adapter from disk at every step."""
        listed = {m["id"] for m in httpx.get(f"{s.url}/models", timeout=30).raise_for_status().json()["data"]}
        if policy.adapter not in listed:
            r = httpx.post(f"{root_url(s.url)}/v1/load_lora_adapter", timeout=self.request_timeout,
                           json={"lora_name": policy.adapter, "lora_path": policy.path})
            if r.is_error:
                rank = vllm_lora_rank(adapter_rank(policy.path))
                reason = (r.text.splitlines() or [""])[0][:300]
                raise AdapterLoadError(
                    f"vLLM server {s.url} did not load the LoRA adapter {policy.path} (HTTP {r.status_code}: "
                    f"{reason}); a server for a LoRA run needs --enable-lora --max-lora-rank {rank} and the "
                    f"environment VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, which `python -m "
                    f"apo_dist.generation.vllm_servers serve --max-lora-rank {rank}` sets")
        s.adapter = policy.adapter

    def unload_adapter(self, s: Server) -> None:
        """Unload server `s`'s adapter (one it no longer has, e.g. after a restart, is fine)."""
        r = httpx.post(f"{root_url(s.url)}/v1/unload_lora_adapter", timeout=self.request_timeout,
                       json={"lora_name": s.adapter})
        if r.status_code != 404:
            r.raise_for_status()
        s.adapter = None

    def check(self, s: Server, model_path: str) -> None:
        """The weight probe: the server's prompt log-probs of the probe text (with its adapter, if any)
        vs the HF scorer on `model_path`."""
        r = httpx.post(f"{s.url}/completions", timeout=self.request_timeout,
                       json={"model": s.adapter or self.model, "prompt": self.probe.ids, "max_tokens": 1,
                             "prompt_logprobs": 0})
        r.raise_for_status()
        rows = r.json()["choices"][0]["prompt_logprobs"][1:]
        self.probe.check(f"vLLM server {s.url}", model_path,
                         [row[str(t)]["logprob"] for row, t in zip(rows, self.probe.ids[1:])])

    def healthy(self, s: Server) -> bool:
        try:
            return httpx.get(f"{root_url(s.url)}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    # --- servers that die ------------------------------------------------------------------
    def _lost(self, s: Server, why: object) -> None:
        """Take `s` out of the pool (once); a local server with restarts left restarts in the background."""
        if not s.alive:
            return
        s.alive = False
        if s.local_index is None:
            log.warning("vLLM server %s is down (%s); its requests go to the other servers", s.url, why)
        elif s.restarts < self.max_restarts:
            log.warning("vLLM server %s is down (%s); its requests go to the other servers while it restarts",
                        s.url, why)
            s.restarting = True
            self._count_restart(s)
            if self._dead is None:
                self._dead = queue.Queue()
                threading.Thread(target=self._restarter, name="vllm-server-restarts", daemon=True).start()
            self._dead.put(s)
        else:
            self._drop(s, f"is down ({why})")

    def _drop(self, s: Server, why: str) -> None:
        """Leave local server `s` out for good, saying so."""
        log.error("vLLM server %s %s; dropped for the rest of the run after %d of %d restarts "
                  "(generation.servers.max_restarts); log: %s", s.url, why, s.restarts, self.max_restarts,
                  self.local.log_path(s.local_index))
        s.restarting = False

    def _count_restart(self, s: Server) -> None:
        """One more restart of `s` (in its count and the pool's)."""
        with self._lock:
            s.restarts += 1
            self.restarts += 1

    def _restarter(self) -> None:
        """The thread that restarts dead local servers, one at a time, for the pool's lifetime: a server
        gets SIGTERM when the thread that started it ends (util.die_with_parent)."""
        while (s := self._dead.get()) is not None:
            self._restart(s)

    def _restart(self, s: Server) -> None:
        """Restart local server `s` after a backoff on the pool's policy and let it rejoin once it passes
        the probe; a failed restart is tried again while `s` has restarts left."""
        while not self._closed.wait(backoff_delay(s.restarts - 1)):
            try:
                policy = self.policy
                log.info("restarting vLLM server %d on %s (restart %d of %d)", s.local_index, policy.path,
                         s.restarts, self.max_restarts)
                self._restart_on(s, policy.weights)
                self.put(s, policy)
                while not self._rejoin(s):  # the pool moved to a new policy meanwhile
                    self.swap(s, self.policy)
                return
            except Exception as e:  # noqa: BLE001 - this thread must go on to the next server
                if self._closed.is_set():
                    return
                if s.restarts >= self.max_restarts:
                    self._drop(s, f"did not restart ({e})")
                    return
                log.warning("vLLM server %d did not restart (%s); trying again", s.local_index, e)
                self._count_restart(s)

    def _rejoin(self, s: Server) -> bool:
        """Put restarted server `s` back in the pool if it serves the pool's policy."""
        with self._lock:
            if s.policy != self.policy:
                return False
            s.alive, s.restarting = True, False
        log.info("vLLM server %s is back (restart %d of %d)", s.url, s.restarts, self.max_restarts)
        return True

    def _no_server_left(self) -> NoServerLeft:
        """The error when no server is left: each server, and the end of its log for a local one."""
        lines = ["every vLLM server of the pool is down:"]
        for s in self.servers:
            lines.append(s.url)
            if s.local_index is not None:
                path = self.local.log_path(s.local_index)
                lines[-1] += f"; end of {path}:\n{log_tail(path)}"
        return NoServerLeft("\n".join(lines))

    # --- generation ------------------------------------------------------------------------
    def generate(self, model_path: str, prompt_ids: list[list[int]], params: SamplingParams) -> pd.DataFrame:
        self.ensure_weights(model_path)
        try:
            results = asyncio.run(self._generate(prompt_ids, params))
        except Exception:
            if _terminated_by:  # SIGTERM's SystemExit can surface as another error from inside the HTTP client
                raise SystemExit(128 + _terminated_by) from None
            raise
        rows = []
        for i, choices in enumerate(results):
            for k, (tokens, logps, finish) in enumerate(choices):
                rows.append(completion_row(self.tokenizer, i, k, tokens, logps, finish))
        return pd.DataFrame(rows)

    async def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[tuple]]:
        from openai import AsyncOpenAI

        sampling = vllm_sampling(params)
        body = {k: sampling.pop(k) for k in ("n", "temperature", "top_p", "max_tokens", "logprobs")}
        body["extra_body"] = {**sampling, "return_token_ids": True}
        clients: dict[str, AsyncOpenAI] = {}  # by URL: a restarted server may come back on a new port

        def client(url: str) -> AsyncOpenAI:
            if url not in clients:
                clients[url] = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=self.request_timeout)
            return clients[url]

        limit = asyncio.Semaphore(self.concurrency)

        async def one(i: int):
            async with limit:
                ids = [int(t) for t in prompt_ids[i]]  # numpy ints are not JSON
                return i, await self._request(client, ids, request_seed(params.seed, i), params.n, body)

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompt_ids))]
        results: list = [None] * len(prompt_ids)
        try:
            for done in tqdm(asyncio.as_completed(tasks), total=len(tasks), disable=not self.progress,
                             desc=f"generate n={params.n}", unit="prompt"):
                i, choices = await done
                results[i] = choices
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients.values():
                await c.close()
        return results

    async def _pick(self) -> Server:
        """The live server with the fewest requests in flight; while none is live, wait for a restart."""
        while not (live := [s for s in self.servers if s.alive]):
            if not any(s.restarting for s in self.servers):
                raise self._no_server_left()
            await asyncio.sleep(0.5)
        return min(live, key=lambda s: s.inflight)

    async def _request(self, client: Callable, ids: list[int], seed: int, n: int, body: dict) -> list[tuple]:
        import openai

        error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            s = await self._pick()
            s.inflight += 1
            try:
                resp = await client(s.url).completions.create(model=s.adapter or self.model, prompt=ids, seed=seed,
                                                              **body)
                choices = sorted(resp.choices, key=lambda c: c.index)
                if len(choices) != n:
                    raise openai.APIError(f"{len(choices)} choices for n={n}", request=None, body=None)
                return [(list(c.token_ids), list(c.logprobs.token_logprobs), c.finish_reason) for c in choices]
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError,
                    openai.APIError) as e:
                if isinstance(e, openai.APIStatusError) and e.status_code < 500 and e.status_code != 429:
                    raise  # a bad request fails the same way everywhere
                error = e
                if not await asyncio.to_thread(self.healthy, s):
                    self._lost(s, e)
                    continue  # failover is immediate
            finally:
                s.inflight -= 1
            await asyncio.sleep(backoff_delay(attempt))
        raise RuntimeError(f"a generation request failed {self.max_retries + 1} times; last error: {error}")

    def close(self) -> None:
        self._closed.set()
        if self._dead is not None:
            self._dead.put(None)
        if self.local is not None:
            self.local.stop()


def main(argv: list[str] | None = None) -> int:
    """`serve`: start K servers on this node, print their URLs, keep them up until signalled."""
    parser = argparse.ArgumentParser(prog="python -m apo_dist.generation.vllm_servers")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start K vLLM servers and keep them up")
    serve.add_argument("--model", required=True)
    serve.add_argument("--num", type=int, default=1)
    serve.add_argument("--workdir", required=True, help="logs go to WORKDIR/servers/")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other nodes")
    serve.add_argument("--urls-file", help="also write the base URLs here, one per line")
    hints = typing.get_type_hints(VLLMConfig)
    for name in SERVER_OPTIONS:  # generation.vllm's engine options, its defaults; --dtype: model.dtype's
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            kind = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        serve.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(VLLMConfig, name))
    serve.add_argument("--max-lora-rank", type=int, default=0,
                       help="a LoRA run's training.lora.rank: the servers load its adapters at runtime (0: LoRA off)")
    serve.add_argument("--startup-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vllm = VLLMConfig(**{name: getattr(args, name) for name in SERVER_OPTIONS})
    servers = LocalServers(args.num, Path(args.workdir), vllm, ModelConfig.dtype, args.host, args.startup_timeout,
                           args.max_lora_rank)
    try:
        urls = servers.start(args.model)
        if args.urls_file:
            Path(args.urls_file).write_text("".join(u + "\n" for u in urls))
        print("\n".join(urls), flush=True)
        while all(p is not None and p.poll() is None for p in servers.procs):
            time.sleep(2)
        return 1  # a server died
    finally:
        servers.stop()


if __name__ == "__main__":
    sys.exit(main())
