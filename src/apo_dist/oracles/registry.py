"""The oracle a config section names (implementations are imported only when chosen)."""
from __future__ import annotations

from .base import Oracle
from .custom import CustomOracle
from .sentiment import SentimentOracle


def make_oracle(oracle_cfg, seed: int, deterministic: bool = False) -> Oracle:
    """The labeller a config section names; `deterministic` drops label noise (used for evaluation)."""
    noise = "none" if deterministic else oracle_cfg.noise
    if oracle_cfg.kind == "sentiment":
        return SentimentOracle(noise, oracle_cfg.noise_temperature, seed)
    if oracle_cfg.kind == "llm_judge":
        from .judge import LLMJudge

        return LLMJudge(oracle_cfg)
    if oracle_cfg.kind == "reward_model":
        from .reward_model import RewardModelOracle

        return RewardModelOracle(oracle_cfg.model, noise, oracle_cfg.noise_temperature, seed)
    if oracle_cfg.kind == "readability":
        from .readability import ReadabilityOracle

        return ReadabilityOracle(noise, oracle_cfg.noise_temperature, seed)
    if oracle_cfg.kind == "custom":
        return CustomOracle(oracle_cfg.function, oracle_cfg.max_retries)
    raise ValueError(f"unknown oracle kind {oracle_cfg.kind!r}")
