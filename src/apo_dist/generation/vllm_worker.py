"""A vLLM worker extension (`worker_extension_cls`): weight reload that keeps tied embeddings tied.

vLLM's in-place `reload_weights` reloads the input embedding of a model with tied word embeddings
but puts the old LM-head tensor back (its log says "ParallelLMHead: Failed to load weights"), so
the model would score with a new body and the old head. `apo_reload_weights` reloads, then ties
the head to the new embedding again and redoes its post-load processing (on CPU the head's GEMM
holds a prepacked copy of the weight). Engines and servers started by apo-dist load this class; the
coordinator calls it through `collective_rpc`.
"""
from __future__ import annotations

RELOAD_METHOD = "apo_reload_weights"
EXTENSION = "apo_dist.generation.vllm_worker.WeightReload"


class WeightReload:
    def apo_reload_weights(self, weights_path: str) -> None:
        self.model_runner.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if self.vllm_config.model_config.hf_text_config.tie_word_embeddings and embed is not None:
            model.lm_head.tie_weights(embed)
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)  # CPU: repack the GEMM
