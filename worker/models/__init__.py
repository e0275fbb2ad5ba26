"""Model registry: Hugging Face architecture name -> implementation."""

from __future__ import annotations

from torch import nn

from worker.config import ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.parallel import SINGLE, WHOLE_MODEL, StageInfo, TPInfo

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(cfg: ModelConfig, tp: TPInfo = SINGLE,
                stage: StageInfo = WHOLE_MODEL) -> nn.Module:
    return MODEL_CLASSES[cfg.architecture](cfg, tp, stage)
