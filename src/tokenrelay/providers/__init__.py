"""Model backends. Each yields internal events and knows nothing of the client's protocol."""

from __future__ import annotations

from tokenrelay.config import ModelConfig
from tokenrelay.providers.base import Provider


def build_provider(cfg: ModelConfig) -> Provider:
    # imported lazily: llama.cpp is only loaded when a model uses it
    if cfg.provider == "mock":
        from tokenrelay.providers.mock import MockProvider

        return MockProvider(cfg)
    if cfg.provider == "openai":
        from tokenrelay.providers.openai import OpenAIProvider

        return OpenAIProvider(cfg)
    if cfg.provider == "anthropic":
        from tokenrelay.providers.anthropic import AnthropicProvider

        return AnthropicProvider(cfg)
    if cfg.provider == "llamacpp":
        from tokenrelay.providers.llamacpp import LlamaCppProvider

        return LlamaCppProvider(cfg)
    raise ValueError(f"unknown provider {cfg.provider!r}")
