"""A Hugging Face sequence-classification model as the preference oracle.

Each side is scored as prompt + completion: the single logit of a one-label reward model, or
the last label's logit minus the first's for a classifier (e.g. positive minus negative). The
answer is the higher score (deterministic) or a seeded Bradley-Terry draw, as for the sentiment
oracle. The model is loaded on the first comparison, on this process's device (devices.process_device).
"""
from __future__ import annotations

import json

import torch

from .. import devices
from .base import score_preference


class RewardModelOracle:
    def __init__(self, model: str, noise: str = "none", temperature: float = 0.1, seed: int = 0,
                 batch_size: int = 16):
        self.model_path, self.noise, self.temperature, self.seed = model, noise, temperature, seed
        self.batch_size = batch_size
        self.identity = json.dumps({"kind": "reward_model", "model": model, "noise": noise,
                                    **({"temperature": temperature, "seed": seed} if noise != "none" else {})},
                                   sort_keys=True)
        self._model = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(self.model_path)
            self._model = model.to(devices.process_device()).eval()
            self._model.config.pad_token_id = self.tokenizer.pad_token_id
        return devices.note(self._model)

    @torch.no_grad()
    def scores(self, texts: list[str]) -> list[float]:
        model = self._load()
        device = devices.model_device(model)
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i: i + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True).to(device)
            logits = model(**batch).logits.float()
            out += (logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]).tolist()
        return out

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        s = self.scores([p + x for p, x in zip(prompts, a)] + [p + y for p, y in zip(prompts, b)])
        n = len(prompts)
        return [{**score_preference(self, p, x, y, s[i], s[n + i]), "model": self.model_path}
                for i, (p, x, y) in enumerate(zip(prompts, a, b))]
