"""Judge calls per second through apo_dist's LLM judge at concurrency 1 and 32.

Starts one local vLLM server on SmolLM2-135M-Instruct (or uses --base-url), then judges distinct
sentiment pairs with `LLMJudge.compare` (no label store) at each concurrency, in each answer mode.
Prints a table and a final line `summary: ... ratio=X.XX` (calls/s at 32 over calls/s at 1, text mode).

    .venv/bin/python benchmarks/judge_throughput.py [--base-url URL --model NAME] [--calls 32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from apo_dist.config import VLLMConfig, load_config
from apo_dist.oracles.judge import LLMJudge

GOOD = [" a warm, funny and moving film", " great acting and a clever plot", " I loved every minute"]
BAD = [" a dull and overlong mess", " the plot makes no sense at all", " I was bored from the start"]


def pairs(n: int, offset: int) -> tuple[list[str], list[str], list[str]]:
    return ([f"Review {offset + i}: I went to see this movie and" for i in range(n)],
            [GOOD[i % 3] for i in range(n)], [BAD[(i + 1) % 3] for i in range(n)])


def measure(base_url: str, model: str, mode: str, concurrency: int, calls: int, offset: int) -> float:
    os.environ.setdefault("APO_BENCH_KEY", "EMPTY")
    cfg = load_config(None, ["model.policy=unused", "oracle.kind=llm_judge", f"oracle.model={model}",
                             f"oracle.base_url={base_url}", "oracle.api_key_env=APO_BENCH_KEY",
                             f"oracle.answer={mode}", "oracle.max_tokens=16", "oracle.max_reasks=0",
                             f"oracle.max_concurrency={concurrency}", "oracle.timeout=300"])
    judge = LLMJudge(cfg.oracle)
    judge.compare(*pairs(2, offset - 2))  # warm-up: connection and server caches
    start = time.perf_counter()
    judge.compare(*pairs(calls, offset))
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="", help="an OpenAI-compatible /v1 URL; default: start a local vLLM")
    parser.add_argument("--model", default="", help="served model name (with --base-url)")
    parser.add_argument("--calls", type=int, default=32, help="calls at concurrency 1 (4x as many at 32)")
    args = parser.parse_args()
    servers = None
    if args.base_url:
        base_url, model = args.base_url, args.model
    else:
        from apo_dist.assets import cache_dir, ensure_model
        from apo_dist.generation.vllm_servers import SERVED_NAME, LocalServers

        servers = LocalServers(1, tempfile.mkdtemp(prefix="judge-bench-"),
                               VLLMConfig(dtype="bfloat16", max_model_len=2048))
        base_url, model = servers.start(str(ensure_model("smollm2-135m-instruct", cache_dir())))[0], SERVED_NAME
    try:
        rows, offset = [], 0
        for mode in ("text", "logprob"):
            for concurrency in (1, 32):
                calls = args.calls * (4 if concurrency > 1 else 1)
                offset += calls + 2
                rows.append((mode, concurrency, calls, measure(base_url, model, mode, concurrency, calls, offset)))
    finally:
        if servers is not None:
            servers.stop()
    print(f"{'answer mode':<12} {'concurrency':>11} {'calls':>6} {'calls/s':>9}")
    for mode, concurrency, calls, rate in rows:
        print(f"{mode:<12} {concurrency:>11} {calls:>6} {rate:>9.2f}")
    rate = {(m, c): r for m, c, _, r in rows}
    print(f"summary: text mode (16 tokens) {rate['text', 1]:.2f} calls/s at concurrency 1, "
          f"{rate['text', 32]:.2f} at 32 (logprob mode ratio {rate['logprob', 32] / rate['logprob', 1]:.2f}) "
          f"ratio={rate['text', 32] / rate['text', 1]:.2f}")


if __name__ == "__main__":
    main()
