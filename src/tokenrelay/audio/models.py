"""The configured audio models (``audio_models``), and admission and accounting for audio requests.

Audio requests pass the same admission as chat (``Admission.admit``: API key or JWT, the plan's models,
budget, request limits and concurrent streams) and, for models with ``max_concurrent``, the same kind of
priority queue. Each leaves one usage and audit record, written by the gateway's record writer like a
chat stream's: for speech the unit is characters of input (``prompt_tokens`` = characters, so a plan's
``prices: {model: {input: X}}`` is X per million characters); for transcription, the upstream's input
tokens (or seconds of audio when it bills by duration) and output tokens (or the transcript's length / 4).
"""

from __future__ import annotations

import hashlib
import importlib
import time
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from tokenrelay.audio.speech import OpenAISpeech, SpeechEngine
from tokenrelay.audio.transcription import OpenAITranscription, TranscriptionEngine
from tokenrelay.config import Config, ConfigError
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.queueing import PriorityGate
from tokenrelay.records import redact
from tokenrelay.request import ChatRequest, new_stream_id
from tokenrelay.upstream_http import HttpPool

if TYPE_CHECKING:
    from tokenrelay.admission import Principal
    from tokenrelay.gateway import Gateway


AudioEngine = SpeechEngine | TranscriptionEngine

# the embedded engines: the kind of model each is, and the module whose parse_options() checks its options
EMBEDDED_ENGINES: dict[str, tuple[Literal["speech", "transcription"], str]] = {
    "espeak": ("speech", "tokenrelay.audio.espeak"),
    "pocketsphinx": ("transcription", "tokenrelay.audio.sphinx"),
}


def check_audio_models(cfg: Config, source: str) -> None:
    """Config checks (config.py calls this): unique names, what each provider needs, engine options."""
    taken = {m.name for m in cfg.models} | {r.name for r in cfg.routers}
    for i, m in enumerate(cfg.audio_models):
        where = f"{source}: audio_models[{i}]"
        if m.name in taken:
            raise ConfigError(f"{where}.name '{m.name}' is already a model's or router's name")
        taken.add(m.name)
        embedded = EMBEDDED_ENGINES.get(m.provider)
        if m.kind is None:
            m.kind = embedded[0] if embedded else "speech"
        if embedded is not None:
            kind, module = embedded
            if m.kind != kind:
                raise ConfigError(f"{where}.kind: {m.provider} models are {kind} models")
            try:
                # imported only when configured: the engines pull in numpy and pocketsphinx
                importlib.import_module(module).parse_options(m.options)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{where}.options: {exc}") from None
        elif not m.base_url:
            raise ConfigError(f"{where} ({m.name}): provider openai needs base_url")
        if m.base_url and not m.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url must start with http:// or https://")
        if m.max_concurrent is not None and m.max_concurrent < 1:
            raise ConfigError(f"{where}.max_concurrent must be at least 1")


class AudioModels:
    """The speech and transcription engines of one gateway process."""

    def __init__(self, config: Config) -> None:
        self.speech: dict[str, SpeechEngine] = {}
        self.transcription: dict[str, TranscriptionEngine] = {}
        self.pool: HttpPool | None = None
        self.gates: dict[str, PriorityGate] = {}
        for m in config.audio_models:
            if m.provider == "openai" and self.pool is None:
                self.pool = HttpPool(256)
            if m.provider == "espeak":
                from tokenrelay.audio.espeak import EspeakSpeech  # numpy loads only when used

                self.speech[m.name] = EspeakSpeech(m)
            elif m.provider == "pocketsphinx":
                from tokenrelay.audio.sphinx import SphinxTranscription  # pocketsphinx loads only when used

                self.transcription[m.name] = SphinxTranscription(m)
            elif m.kind == "speech":
                assert self.pool is not None
                self.speech[m.name] = OpenAISpeech(m, self.pool)
            else:
                assert self.pool is not None
                self.transcription[m.name] = OpenAITranscription(m, self.pool)
            if m.max_concurrent:
                self.gates[m.name] = PriorityGate(
                    m.name, m.max_concurrent, m.max_queue_wait_seconds, m.max_queue
                )
        # the most a transcription upload may be (the body is read before its model is known)
        self.max_upload_bytes = (
            max((t.max_file_bytes for t in self.transcription.values()), default=0) + 1024 * 1024
        )

    def engines(self) -> dict[str, AudioEngine]:
        return {**self.speech, **self.transcription}

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines().values())

    async def close(self) -> None:
        for engine in self.engines().values():
            await engine.close()
        if self.pool is not None:
            self.pool.close()

    def speech_model(self, name: str, chat_models: frozenset[str], param: str = "model") -> SpeechEngine:
        engine = self.speech.get(name)
        if engine is not None:
            return engine
        self._wrong_kind(name, "speech", chat_models, param)
        raise AssertionError

    def transcription_model(
        self, name: str, chat_models: frozenset[str], param: str = "model"
    ) -> TranscriptionEngine:
        engine = self.transcription.get(name)
        if engine is not None:
            return engine
        self._wrong_kind(name, "transcription", chat_models, param)
        raise AssertionError

    def refuse_chat_use(self, name: str, chat_models: list[str]) -> None:
        """An audio model's name sent to a chat endpoint: 400 naming the endpoint that serves it."""
        if name in self.speech:
            endpoint = "/v1/audio/speech"
        elif name in self.transcription:
            endpoint = "/v1/audio/transcriptions"
        else:
            return
        raise invalid(
            f"'{name}' is an audio model, not a chat model: it is served at {endpoint}. "
            f"Chat models: {', '.join(chat_models)}.",
            param="model",
            code="wrong_model_kind",
        )

    def _wrong_kind(self, name: str, wanted: str, chat_models: frozenset[str], param: str) -> None:
        names = ", ".join(self.speech if wanted == "speech" else self.transcription) or "none configured"
        if name in chat_models:
            what = "a chat model"
        elif name in self.speech:
            what = "a speech model"
        elif name in self.transcription:
            what = "a transcription model"
        else:
            raise GatewayError(
                404,
                f"The model '{name[:100]}' does not exist. {wanted.capitalize()} models: {names}.",
                param=param,
                code="model_not_found",
            )
        raise invalid(
            f"'{name}' is {what}, not a {wanted} model. {wanted.capitalize()} models: {names}.",
            param=param,
            code="wrong_model_kind",
        )


class Grant:
    """An admitted audio request: its principal and queue slot until ``finish()``, which frees both and
    writes the usage record."""

    __slots__ = ("gate", "gateway", "id", "model", "principal", "protocol", "started", "ttft")

    def __init__(
        self,
        gateway: Gateway,
        model: str,
        protocol: str,
        principal: Principal | None,
        gate: PriorityGate | None,
    ) -> None:
        self.gateway = gateway
        self.model = model
        self.protocol = protocol
        self.principal = principal
        self.gate = gate
        self.id = new_stream_id("audio-")
        self.started = time.perf_counter()
        self.ttft: float | None = None  # seconds to the first byte of the answer

    def first_byte(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def finish(self, status: int, input_units: int, output_units: int, request: Any = None) -> None:
        if self.gate is not None:
            self.gate.release()
            self.gate = None
        gw = self.gateway
        principal = self.principal
        gw.admission.release(principal, input_units + output_units)
        if not gw.admission.loaded:
            return
        encoded = msgspec.json.encode(request)
        gw.records.add(
            {
                "ts": time.time(),
                "key_id": principal.key.id if principal else None,
                "stream_id": self.id,
                "model": self.model,
                "deployment": self.model,
                "protocol": self.protocol,
                "status": status,
                "prompt_tokens": input_units,
                "completion_tokens": output_units,
                "ttft_ms": round(self.ttft * 1000, 3) if self.ttft is not None else None,
                "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
                "cost": principal.plan.cost(self.model, input_units, output_units) if principal else 0.0,
                "request_hash": hashlib.sha256(encoded).hexdigest(),
                "body": msgspec.json.encode(redact(msgspec.json.decode(encoded))).decode()
                if gw.config.server.audit_bodies
                else None,
            }
        )


async def admit(gateway: Gateway, credential: bytes | None, model: str, protocol: str) -> Grant:
    """Admission for an audio request (the chat path's, see the module notes), then the model's queue."""
    # admission reads only the model name off the request; an audio request has no chat messages
    principal = await gateway.admission.admit(credential, ChatRequest(model=model, messages=[]))
    gate = gateway.audio.gates.get(model)
    if gate is not None:
        try:
            await gate.acquire(principal.plan.priority if principal else 0)
        except BaseException:
            gateway.admission.release(principal, 0)
            raise
    return Grant(gateway, model, protocol, principal, gate)
