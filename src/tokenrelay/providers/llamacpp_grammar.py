"""Constrained output for the embedded model: JSON mode, JSON schemas and tool calls as llama.cpp grammars.

``plan()`` reads what a request asks for (``response_format``, ``tools`` and ``tool_choice``) and turns it
into a ``Constraint``: the JSON schema the output must match, the request field to blame when that schema
cannot be enforced, and the instruction the model gets in its system prompt (a 135M model writes far better
JSON when it is told what the grammar will force anyway). ``compile_grammar()`` turns a schema into a
llama.cpp grammar with llama-cpp-python's converter, and checks it with llama.cpp's own parser: a grammar
llama.cpp rejects would otherwise reach the sampler as a null pointer in the middle of a generation.

Tool calls are generated as one JSON object, ``{"name": ..., "arguments": {...}}``, its ``arguments``
constrained by the tool's parameters schema; ``CallText`` watches the generated text and turns it into
standard ``ToolCallDelta`` events as it comes (the name once the header is complete, then the arguments in
the fragments the model wrote them in).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import msgspec

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import ToolCallDelta
from tokenrelay.openai_wire import NamedToolChoice, Tool
from tokenrelay.request import ChatRequest

# json_schema_to_gbnf unrolls bounded repetitions (maxLength, maxItems ...) into nested groups; llama.cpp's
# recursive-descent parser overflows its stack somewhere past 10,000 levels (a segfault, not an error), and
# already refuses grammars past about 1,000 repetitions, so deeper or larger grammars are refused up front.
MAX_NESTING = 1000
MAX_GRAMMAR_CHARS = 256_000
_CANONICAL = msgspec.json.Encoder(order="sorted")


class Constraint(msgspec.Struct, frozen=True):
    """What one request's output must look like."""

    schema: dict[str, Any]
    param: str  # the request field at fault when the schema cannot be enforced
    instruction: str  # added to the system prompt
    tools: bool = False  # the output is a tool call (or, with ``free_text``, plain text)
    free_text: bool = False  # tool_choice auto: plain text is allowed too

    def key(self) -> bytes:
        """The cache key: the canonical JSON of the schema, and whether text is allowed besides."""
        return (b"t" if self.free_text else b"s") + _CANONICAL.encode(self.schema)


def plan(req: ChatRequest) -> Constraint | None:
    """The constraint a request asks for, or ``None`` for free text. 400s name the field at fault."""
    if req.tools and req.tool_choice != "none":
        return _tool_constraint(req.tools, req.tool_choice)
    fmt = req.response_format
    if not fmt:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(
            schema={"type": "object"},
            param="response_format",
            instruction="Reply with a JSON object only.",
        )
    if kind != "json_schema":
        raise invalid(
            "response_format.type must be 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:  # OpenAI lets the schema be left out: any JSON object then
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise invalid(
            "response_format.json_schema.schema must be a JSON schema object.",
            param="response_format.json_schema.schema",
        )
    _check_refs(schema, "response_format.json_schema.schema")
    return Constraint(
        schema=schema,
        param="response_format.json_schema.schema",
        instruction="Reply with JSON only, matching this JSON schema: "
        + msgspec.json.encode(schema).decode(),
    )


def _tool_constraint(tools: list[Tool], choice: str | NamedToolChoice | None) -> Constraint:
    indexed = list(enumerate(tools))
    if isinstance(choice, NamedToolChoice):
        indexed = [(i, t) for i, t in indexed if t.function.name == choice.function.name]
        if not indexed:
            raise invalid(
                f"tool_choice names '{choice.function.name}', which is not one of the tools.",
                param="tool_choice.function.name",
            )
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    lines: list[str] = []
    for k, (i, tool) in enumerate(indexed):
        fn = tool.function
        params = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        _check_refs(params, f"tools[{i}].function.parameters")
        # each tool's parameters move to $defs/tool-k, their own references and definitions with them (the
        # converter resolves references through objects only, and names rules after the last path step)
        defs[f"tool-{k}"] = _rebase(params, f"#/$defs/tool-{k}", f"t{k}-")
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn.name}, "arguments": {"$ref": f"#/$defs/tool-{k}"}},
                "required": ["name", "arguments"],
            }
        )
        described = f": {fn.description}" if fn.description else ""
        lines.append(f"- {fn.name}{described} Arguments: {msgspec.json.encode(params).decode()}")
    how = 'To call one, reply with only a JSON object: {"name": <function name>, "arguments": {...}}.'
    if choice == "auto" or choice is None:
        how += " If none of them is needed, answer normally instead."
    elif isinstance(choice, NamedToolChoice):
        how += f" Call {choice.function.name} now."
    else:
        how += " Call one of them now."
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    return Constraint(
        schema={**schema, "$defs": defs},
        param="tools" if len(indexed) > 1 else f"tools[{indexed[0][0]}].function.parameters",
        instruction="You can call these functions:\n" + "\n".join(lines) + "\n" + how,
        tools=True,
        free_text=choice == "auto" or choice is None,
    )


def _check_refs(schema: Any, where: str) -> None:
    """Only references inside the schema itself: the converter would otherwise try to fetch a URL."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            raise invalid(f"Only local '$ref's (starting with '#') are supported: {ref!r}.", param=where)
        for value in schema.values():
            _check_refs(value, where)
    elif isinstance(schema, list):
        for value in schema:
            _check_refs(value, where)


def _rebase(schema: Any, base: str, prefix: str) -> Any:
    """A parameters schema moved to ``base`` of the call schema: its local ``$ref``s point there, and its
    definitions get ``prefix`` so that two tools' definitions of one name stay apart."""
    if isinstance(schema, list):
        return [_rebase(v, base, prefix) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            out[key] = {prefix + name: _rebase(v, base, prefix) for name, v in value.items()}
        elif key == "$ref" and isinstance(value, str) and value.startswith("#"):
            steps = value[1:].split("/")
            renamed = [
                prefix + step if j > 0 and steps[j - 1] in ("$defs", "definitions") else step
                for j, step in enumerate(steps)
            ]
            out[key] = base + "/".join(renamed)
        else:
            out[key] = _rebase(value, base, prefix)
    return out


def _nesting(gbnf: str) -> int:
    """The deepest group nesting in a grammar (parentheses outside literals and character classes)."""
    depth = deepest = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "#":  # a comment runs to the end of the line
            while i < n and gbnf[i] != "\n":
                i += 1
        i += 1
    return deepest


_ROOT = re.compile(r"^root ::= ", re.M)


def compile_grammar(constraint: Constraint, vocab: Any) -> Any:
    """The ``LlamaGrammar`` for a constraint; ``GatewayError`` (400) when it cannot be enforced.

    CPU work (the converter is Python, the check is llama.cpp's parser): runs in the provider's grammar
    thread. ``vocab`` is the loaded model's vocabulary, which llama.cpp's parser reads and never writes."""
    from llama_cpp import llama_cpp as lib
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(msgspec.json.encode(constraint.schema).decode())
    except Exception as exc:  # the converter reports unsupported schemas with asserts and ValueErrors
        raise _unenforceable(constraint, str(exc) or type(exc).__name__) from exc
    if constraint.free_text:
        # the call, or text that does not start with "{" (which tells the two apart from the first token)
        gbnf = _ROOT.sub("tokenrelay-call ::= ", gbnf, count=1)
        gbnf = "root ::= tokenrelay-call | tokenrelay-text\ntokenrelay-text ::= [^{] .*\n" + gbnf
    if len(gbnf) > MAX_GRAMMAR_CHARS or _nesting(gbnf) > MAX_NESTING:
        raise _unenforceable(constraint, "the grammar it needs is too large (lower maxLength, maxItems ...)")
    sampler = lib.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise _unenforceable(constraint, "llama.cpp could not parse the grammar built from it")
    lib.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(gbnf, verbose=False)


def _unenforceable(constraint: Constraint, why: str) -> GatewayError:
    what = "tool parameters schema" if constraint.tools else "JSON schema"
    return invalid(
        f"The embedded model cannot enforce this {what}: {why}",
        param=constraint.param,
        code="unsupported_schema",
    )


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*', re.S)


class CallText:
    """Generated text -> ``ToolCallDelta``s (or, when text is allowed too, plain text), as it arrives.

    The grammar fixes the shape ``{"name": "<name>", "arguments": <value>}`` with at most a space between
    tokens. The header is held until the name is complete; then every piece of the arguments value goes
    out as the fragment it arrived in, and whatever follows the value (the closing brace) is dropped. Runs
    in the engine thread, a few characters a token."""

    __slots__ = (
        "_args_started",
        "_depth",
        "_escape",
        "_head",
        "_in_string",
        "_value_started",
        "call_id",
        "done",
        "mode",
    )

    def __init__(self, free_text: bool) -> None:
        self.mode = "undecided" if free_text else "call"
        self.call_id = new_call_id()
        self._head = ""
        self._args_started = False
        self._value_started = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self.done = False  # the call's arguments are complete

    @property
    def started(self) -> bool:
        """The call's first delta (id and name) went out."""
        return self._args_started

    def feed(self, text: str) -> str | ToolCallDelta | None:
        """What this piece of generated text adds to the stream."""
        if self.mode == "text":
            return text
        if self.mode == "undecided":
            # the grammar's call starts with "{" itself, its text with anything else (a space included)
            self.mode = "call" if text[:1] == "{" else "text"
            if self.mode == "text":
                return text
        if self.done:
            return None
        if not self._args_started:
            self._head += text
            match = _HEADER.match(self._head)
            if match is None:
                return None
            self._args_started = True
            name = msgspec.json.decode(match.group(1).encode(), type=str)
            rest = self._args(self._head[match.end() :])
            return ToolCallDelta(index=0, id=self.call_id, name=name, arguments=rest)
        rest = self._args(text)
        return ToolCallDelta(index=0, arguments=rest) if rest else None

    def _args(self, text: str) -> str:
        """The part of ``text`` that belongs to the arguments value; marks ``done`` at its end."""
        start = 0
        if not self._value_started:
            start = len(text) - len(text.lstrip())
            if start == len(text):
                return ""
            self._value_started = True
        for i in range(start, len(text)):
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return text[start : i + 1]
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]" and self._depth > 0:
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return text[start : i + 1]
            elif self._depth == 0 and c in " }\n":
                self.done = True  # a bare number or literal ends at the space or brace after it
                return text[start:i]
        return text[start:]
