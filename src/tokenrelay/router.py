"""Router: picks the deployment that serves a request's model.

Today a model name maps to one deployment; retries, fallback chains, breakers and latency-aware
choice (issues 4 and 6) grow here, behind the same ``route()`` call.
"""

from __future__ import annotations

from tokenrelay.errors import GatewayError
from tokenrelay.providers.base import Provider
from tokenrelay.request import ChatRequest


class Router:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers

    def route(self, req: ChatRequest) -> Provider:
        provider = self.providers.get(req.model)
        if provider is None:
            raise GatewayError(
                404,
                f"The model '{req.model}' does not exist. Models served here: {', '.join(self.providers)}.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return provider
