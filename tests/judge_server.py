"""A real OpenAI-compatible judge for tests, and a fault-injection proxy in front of it.

`judge_server`: one vLLM CPU server per test session serving SmolLM2-135M-Instruct (started by
apo_dist.generation.vllm_servers.LocalServers, answering to the model name JUDGE_MODEL), batching as
vLLM does by default. `invariant_judge_server` (one per test module that asks for it): the same judge
computing each request whole and alone (max_num_seqs 1, no prefix caching), so a logprob answer is the
same bitwise whatever else it is asked, before or at the same time (README: generation.vllm.prefix_caching).

`FaultProxy`: an aiohttp server on 127.0.0.1 (in a thread of the test process) that forwards
requests to the judge and turns a seeded fraction of them into faults: 429 with Retry-After,
500, a reply slower than the client's timeout, malformed JSON, or a body cut short of its
Content-Length (and, when asked for, "reject": a 401 quoting the key back). It counts requests
per comparison (prompt + unordered pair, read from the judge prompt's <<< >>> blocks) so tests
can prove that a stored answer is never asked again.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
from collections import Counter

import pytest

JUDGE_KEY = "sk-apo-test-4f8e2b1c9d7a"  # a fake key; tests check it never leaks
JUDGE_MODEL = "policy"  # LocalServers' served model name
FAULTS = ("429", "500", "timeout", "malformed", "truncated")


def start_judge(workdir, **options):
    """Start a judge server in `workdir` (generation.vllm `options`); yields its base URL (…/v1), then stops it."""
    pytest.importorskip("vllm", reason="the judge server needs vLLM (the CPU build needs AVX-512)")
    from apo_dist.assets import cache_dir, ensure_model
    from apo_dist.config import VLLMConfig
    from apo_dist.generation.vllm_servers import LocalServers

    model = ensure_model("smollm2-135m-instruct", cache_dir())
    servers = LocalServers(1, workdir, VLLMConfig(dtype="bfloat16", max_model_len=2048, **options))
    try:
        yield servers.start(str(model))[0]
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def judge_server(tmp_path_factory):
    """Base URL (…/v1) of a vLLM server serving SmolLM2-135M-Instruct (model name JUDGE_MODEL)."""
    yield from start_judge(tmp_path_factory.mktemp("judge_vllm"))


@pytest.fixture(scope="module")
def invariant_judge_server(tmp_path_factory):
    """judge_server's model on a server whose answers do not depend on batching (one request a step,
    no prefix caching): slower, for tests that compare answers asked at different times bitwise."""
    yield from start_judge(tmp_path_factory.mktemp("invariant_judge_vllm"), max_num_seqs=1, prefix_caching=False)


def pair_key(prompt: str, a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([prompt, *sorted((a, b))]).encode()).hexdigest()


def request_pair_key(body: bytes) -> str | None:
    """The comparison a judge request is about, from its <<< >>> blocks."""
    try:
        content = json.loads(body)["messages"][0]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    blocks = re.findall(r"<<<\n(.*?)\n>>>", content, re.S)
    return pair_key(*blocks[:3]) if len(blocks) >= 3 else None


class FaultProxy:
    """See the module docstring. `fault_rate` of requests fail, kinds drawn from `faults`."""

    def __init__(self, upstream: str, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 slow_seconds: float = 7.0, retry_after: float = 1.0, seed: int = 0):
        self.upstream = upstream.rstrip("/")
        self.fault_rate, self.faults, self.slow_seconds, self.retry_after = fault_rate, faults, slow_seconds, retry_after
        self.rng = random.Random(seed)
        self.counts: Counter = Counter()  # comparison key -> requests seen
        self.injected: Counter = Counter()  # fault kind -> times injected
        self.forwarded = 0
        self.auth_headers: set[str] = set()
        self.url = ""

    def __enter__(self) -> "FaultProxy":
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def _serve(self, ready: threading.Event) -> None:
        from aiohttp import ClientSession, ClientTimeout, web

        asyncio.set_event_loop(self.loop)

        async def start():
            self.session = ClientSession(timeout=ClientTimeout(total=300))
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}/v1"

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    async def _shutdown(self) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def _handle(self, request):
        from aiohttp import web

        body = await request.read()
        key = request_pair_key(body)
        if key is not None:
            self.counts[key] += 1
        self.auth_headers.add(request.headers.get("Authorization", ""))
        kind = self.rng.choice(self.faults) if key is not None and self.rng.random() < self.fault_rate else None
        if kind:
            self.injected[kind] += 1
        if kind == "429":
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": str(self.retry_after)})
        if kind == "reject":  # like a hosted API refusing a key, quoting it back
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return web.json_response({"error": {"message": f"Incorrect API key provided: {key}",
                                                "type": "invalid_request_error"}}, status=401)
        if kind == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if kind == "timeout":
            await asyncio.sleep(self.slow_seconds)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self.session.request(request.method, self.upstream + request.path_qs.removeprefix("/v1"),
                                        data=body, headers=headers) as reply:
            data, status = await reply.read(), reply.status
        self.forwarded += 1
        if kind == "malformed":
            return web.Response(body=data[: len(data) // 2], status=200, content_type="application/json")
        if kind == "truncated":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                               "Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 3])
            request.transport.close()
            return response
        return web.Response(body=data, status=status, content_type="application/json")
