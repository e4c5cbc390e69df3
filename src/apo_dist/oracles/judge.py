"""The pairwise LLM judge over any OpenAI-compatible chat endpoint (OpenAI, Azure, vLLM).

The prompt follows the paper's structure in our own words: the task's criterion, the context
and the two candidates, then a one-sentence comparison and a last line with only "A" or "B".
Which candidate is shown as A is drawn per comparison (seeded by its key, so a repeat shows the
same order) and recorded; `both_orders` asks both ways and records whether they agree.

Answer modes: "text" parses the verdict line (`parse_verdict`); "logprob" asks for one token
and reads P(A) and P(B) from the top log-probabilities, normalised to a soft label. An answer
that cannot be read is asked again up to `max_reasks` times, then the pair is unlabelable with
the reason. HTTP failures are retried by `calls.retry`. The API key is read from the
environment variable `api_key_env` names and is scrubbed from every message this module raises
or logs.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time

import openai

from ..calls import RateLimiter, RetriesExhausted, Transient, retry
from .base import OracleError, comparison_key

PROMPT_VERSION = "judge-v1"

# task -> (what is judged, context name, candidate name, plural, the question)
TASKS = {
    "sentiment": ("continuations of the opening of a movie review", "Review opening", "Continuation",
                  "continuations", "Which continuation expresses the more positive sentiment about the movie? "
                  "Judge the sentiment only, not grammar, style or fluency."),
    "summary": ("summaries of a forum post", "Post", "Summary", "summaries",
                "Which summary states the most important points of the post more accurately and concisely, "
                "without adding anything the post does not say?"),
    "helpfulness": ("responses to a user's request", "Request", "Response", "responses",
                    "Which response serves the user better: more helpful, correct and harmless?"),
}

_DECORATION = "*_`#>\"'\u201c\u201d\u2018\u2019[]"
_VERDICT = re.compile(
    r"^(?:(?:final\s+)?(?:answer|verdict|choice|preferred|preference|winner|better(?:\s+one)?)"
    r"(?:\s+is)?\s*[:=\-]?\s*)?(?:(?:response|completion|continuation|summary|option|output)\s+)?"
    r"\(?([AB])\)?$", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(I can(?:no|')t|I'm sorry|I am sorry|I'm unable|I am unable|I won't|as an AI)\b",
                      re.IGNORECASE)


class JudgeError(OracleError):
    """A judge failure that retrying cannot fix (bad key, unknown model, bad request)."""


def render(task: str, answer: str, prompt: str, first: str, second: str) -> list[dict]:
    """Chat messages asking which of `first` (shown as A) and `second` (B) is better."""
    what, context, item, items, question = TASKS[task]
    if answer == "text":
        ask = (f"First write one sentence comparing the two {items}. Then, on a new line, write only "
               f"the letter of the better one: A or B.")
    else:
        ask = "Answer with a single letter, A or B, and nothing else."
    text = (f"You are comparing two {what}.\n\n"
            f"{context}:\n<<<\n{prompt}\n>>>\n\n"
            f"{item} A:\n<<<\n{first}\n>>>\n\n"
            f"{item} B:\n<<<\n{second}\n>>>\n\n"
            f"{question}\n{ask}")
    return [{"role": "user", "content": text}]


def parse_verdict(text: str | None) -> tuple[str | None, str]:
    """("A" or "B", "") from a text answer, or (None, why it cannot be read).

    The verdict is the last non-empty line, stripped of markdown, quotes and punctuation: either
    a bare letter (any case, optionally after "Answer:", "Preferred: Response" ...) or a line in
    which exactly one of the capital letters A and B stands alone. A line naming both is not a
    verdict; failing the last line, the last line that is a bare verdict counts.
    """
    lines = [line.strip().strip(_DECORATION).strip().rstrip(".!,;:").strip(_DECORATION).strip()
             for line in (text or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None, "empty answer"
    match = _VERDICT.match(lines[-1])
    if match:
        return match.group(1).upper(), ""
    letters = set(re.findall(r"(?<![\w'])([AB])(?![\w'])", lines[-1]))
    if len(letters) == 2:
        return None, "both A and B in the verdict line"
    if letters:
        return letters.pop(), ""
    for line in reversed(lines[:-1]):
        match = _VERDICT.match(line)
        if match:
            return match.group(1).upper(), ""
    if _REFUSAL.search(text or ""):
        return None, "refusal"
    return None, "no A/B verdict"


def read_logprobs(top_logprobs: list[tuple[str, float]]) -> tuple[float | None, str]:
    """(P(A) / (P(A) + P(B)), "") from (token, logprob) pairs, or (None, why)."""
    p = {"A": 0.0, "B": 0.0}
    for token, logprob in top_logprobs:
        letter = token.strip()
        if letter in p:
            p[letter] += math.exp(logprob)
    if p["A"] + p["B"] == 0.0:
        return None, "neither A nor B among the top log-probabilities"
    return p["A"] / (p["A"] + p["B"]), ""


def _retry_after(e: openai.APIStatusError) -> float | None:
    headers = e.response.headers
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000.0
        return float(headers["retry-after"]) if headers.get("retry-after") else None
    except ValueError:  # an HTTP date: fall back to backoff
        return None


class LLMJudge:
    """Oracle protocol over an OpenAI-compatible chat endpoint; see the module docstring."""

    def __init__(self, cfg):
        self.base_url = cfg.base_url or None
        self.model, self.task, self.answer = cfg.model, cfg.task, cfg.answer
        self.temperature, self.both_orders, self.max_tokens = cfg.temperature, cfg.both_orders, cfg.max_tokens
        self.max_reasks, self.max_retries, self.timeout = cfg.max_reasks, cfg.max_retries, cfg.timeout
        self.max_concurrency = cfg.max_concurrency
        price = cfg.prices.get(cfg.model)
        self.price = (price.input, price.output) if price is not None else None
        self.requests_limit = RateLimiter(cfg.requests_per_minute)
        self.tokens_limit = RateLimiter(cfg.tokens_per_minute)
        self._key = os.environ.get(cfg.api_key_env, "")
        if not self._key:
            raise JudgeError(f"the environment variable {cfg.api_key_env} (oracle.api_key_env) is not set; "
                             "it must hold the judge's API key (any non-empty value for a server without auth)")
        self.prompt_version = f"{PROMPT_VERSION}/{self.task}/{self.answer}"
        self.identity = json.dumps({"kind": "llm_judge", "model": self.model, "prompt_version": self.prompt_version,
                                    "temperature": self.temperature, "both_orders": self.both_orders,
                                    **({"max_tokens": self.max_tokens} if self.answer == "text" else {})},
                                   sort_keys=True)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        try:
            return asyncio.run(self._compare(prompts, a, b))
        except JudgeError as e:
            raise JudgeError(self.redact(str(e))) from None
        except Exception as e:  # never let a message carrying the key escape
            raise JudgeError(self.redact(f"{type(e).__name__}: {e}")) from None

    async def _compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        self._slots = asyncio.Semaphore(self.max_concurrency)
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key, timeout=self.timeout,
                                      max_retries=0) as client:
            return list(await asyncio.gather(*(self._judge(client, p, x, y) for p, x, y in zip(prompts, a, b))))

    def shown_order(self, prompt: str, a: str, b: str) -> str:
        """"ab" when a is shown as A; drawn once per comparison, whatever order it is asked in."""
        first_shown_first = random.Random(comparison_key(self.identity, prompt, a, b)).random() < 0.5
        return "ab" if first_shown_first == (a <= b) else "ba"

    async def _judge(self, client, prompt: str, a: str, b: str) -> dict:
        orders = ["ab", "ba"] if self.both_orders else [self.shown_order(prompt, a, b)]
        try:
            asks = await asyncio.gather(*(self._ask(client, prompt, a, b, order) for order in orders))
        except RetriesExhausted as e:
            return {"status": "error", "reason": self.redact(str(e))}
        read = [x["p_a"] for x in asks if x["p_a"] is not None]
        tokens_in, tokens_out = sum(x["input_tokens"] for x in asks), sum(x["output_tokens"] for x in asks)
        answer = {
            "label": sum(read) / len(read) if read else None,
            "reason": "" if read else "; ".join(x["reason"] for x in asks),
            "model": self.model, "prompt_version": self.prompt_version,
            "shown_order": "both" if self.both_orders else orders[0],
            "raw_text": "\n---\n".join(t for x in asks for t in x["texts"]),
            "input_tokens": tokens_in, "output_tokens": tokens_out,
            "cost": (tokens_in * self.price[0] + tokens_out * self.price[1]) / 1e6 if self.price else None,
            "latency": sum(x["latency"] for x in asks),
            "asks": sum(len(x["texts"]) for x in asks),
        }
        if self.both_orders:
            answer["p_a_by_order"] = [x["p_a"] for x in asks]
            answer["agreement"] = (None if len(read) < 2 else
                                   (read[0] > 0.5) == (read[1] > 0.5) and (read[0] == 0.5) == (read[1] == 0.5))
        return answer

    async def _ask(self, client, prompt: str, a: str, b: str, order: str) -> dict:
        """P(a preferred) from one order of presentation, re-asking unreadable answers."""
        first, second = (a, b) if order == "ab" else (b, a)
        messages = render(self.task, self.answer, prompt, first, second)
        texts, tokens_in, tokens_out, latency, p_first, reason = [], 0, 0, 0.0, None, ""
        for _ in range(self.max_reasks + 1):
            reply, seconds = await self._request(client, messages)
            latency += seconds
            if reply.usage is not None:
                tokens_in += reply.usage.prompt_tokens or 0
                tokens_out += reply.usage.completion_tokens or 0
            choice = reply.choices[0]
            texts.append(choice.message.content or "")
            if self.answer == "logprob":
                top = choice.logprobs.content[0].top_logprobs if choice.logprobs and choice.logprobs.content else []
                p_first, reason = read_logprobs([(t.token, t.logprob) for t in top])
            else:
                letter, reason = parse_verdict(texts[-1])
                p_first = None if letter is None else float(letter == "A")
            if p_first is not None:
                break
        p_a = None if p_first is None else (p_first if order == "ab" else 1.0 - p_first)
        return {"p_a": p_a, "reason": reason, "texts": texts, "input_tokens": tokens_in,
                "output_tokens": tokens_out, "latency": latency}

    async def _request(self, client, messages: list[dict]):
        extra = {"logprobs": True, "top_logprobs": 20} if self.answer == "logprob" else {}
        max_tokens = 1 if self.answer == "logprob" else self.max_tokens
        estimate = len(messages[0]["content"]) / 4 + max_tokens  # ~4 characters per token

        async def once():
            await self.requests_limit.acquire(1)
            await self.tokens_limit.acquire(estimate)
            async with self._slots:
                start = time.monotonic()
                try:
                    reply = await client.chat.completions.create(
                        model=self.model, messages=messages, temperature=self.temperature,
                        max_tokens=max_tokens, **extra)
                except openai.APIStatusError as e:
                    if e.status_code == 429 or e.status_code >= 500 or e.status_code in (408, 409):
                        raise Transient(f"HTTP {e.status_code}", _retry_after(e)) from None
                    raise JudgeError(self.redact(f"HTTP {e.status_code} from the judge: {e.message}")) from None
                except openai.APITimeoutError:
                    raise Transient(f"timed out after {self.timeout} s") from None
                except (openai.APIError, ValueError, OSError) as e:
                    raise Transient(self.redact(f"{type(e).__name__}: {e}")) from None
                if not getattr(reply, "choices", None) or reply.choices[0].message is None:
                    raise Transient("malformed reply (no choices)")
                return reply, time.monotonic() - start

        return await retry(once, self.max_retries, what=f"judge {self.model}")
