"""Request bodies (pydantic) and their translation to core SamplingParams."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.tool_formats import FORMATS, ToolFormat, openai_calls
from strata.engine.request import Checked
from strata.grammar.constraint import (
    Constraint,
    constraint_from_fields,
    constraint_from_response_format,
)
from strata.sampling.params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _SamplingFields(_Body):
    """The sampling knobs both API styles share (same names, same meaning)."""

    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    # strata's: the cached prefix outlasts lower priorities in eviction, for priority_ttl s
    priority: int = Field(default=0, ge=0, le=100)
    priority_ttl: float = Field(default=600.0, gt=0, le=86400)

    def constraint(self) -> Constraint | None:
        return constraint_from_fields(self.regex, self.json_schema, self.ebnf)

    def to_params(
        self,
        max_new_tokens: int,
        logprobs: bool,
        top_logprobs: int,
        constraint: Constraint | None = None,
        logprob_start_len: int = -1,
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logprob_start_len=logprob_start_len,
            constraint=constraint or self.constraint(),
            logit_bias=self.bias(),
            priority=self.priority,
            priority_ttl=self.priority_ttl,
        )

    def bias(self) -> tuple[tuple[int, float], ...]:
        return ()


class SessionParams(_Body):
    """SGLang's session_params: the session, the request of it to continue (default its
    newest), where in that request's tokens (negative: from the end), and whether the
    session then forgets its other requests."""

    id: str = Field(min_length=1)
    rid: str | None = None
    offset: int | None = None
    replace: bool = False


class OpenSessionRequest(_Body):
    capacity_of_str_len: int | None = Field(default=None, ge=1)  # tokens, at most
    timeout: float | None = Field(default=None, gt=0)  # seconds after its last request


class CloseSessionRequest(_Body):
    session_id: str = Field(min_length=1)


class _OpenAISampling(_SamplingFields):
    model: str | None = None
    # strata's extra field: pin the conversation's KV in this open session (the messages
    # or prompt are sent whole, as usual; rid and offset do not apply)
    session_params: SessionParams | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]

    def bias(self) -> tuple[tuple[int, float], ...]:
        try:
            return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None

    def sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        fmt = constraint_from_response_format(self.response_format)
        if fmt is not None and self.constraint() is not None:
            raise ValueError("give either response_format or regex/json_schema/ebnf, not both")
        return self.to_params(max_tokens or self.max_tokens or 16, logprobs, top_logprobs, fmt)

    def fan_out(self, request: Checked) -> list[Checked]:
        """One request per choice (`n`); with a seed, choice i samples with seed + i (the
        seed is nothing a check looks at)."""
        seed = request.params.seed
        if seed is None:
            return [request] * self.n
        return [
            dataclasses.replace(request, params=dataclasses.replace(request.params, seed=seed + i))
            for i in range(self.n)
        ]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAISampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt's text comes first in each choice

    def params(self) -> SamplingParams:
        n = self.logprobs
        return self.sampling(None, n is not None, n or 0)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def templated(self) -> dict[str, Any]:
        """The message as chat templates with tools take it (a call's arguments as an
        object, not OpenAI's JSON string)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                f = dict(c.get("function") or {})
                if isinstance(f.get("arguments"), str):
                    try:
                        f["arguments"] = json.loads(f["arguments"])
                    except json.JSONDecodeError:
                        raise ValueError("a tool call's arguments must be JSON") from None
                calls.append({**c, "function": f})
            out["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ToolFunction(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class Tool(_Body):
    type: Literal["function"]
    function: ToolFunction


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {function}
    parallel_tool_calls: bool | None = None

    def params(self) -> SamplingParams:
        params = self.sampling(self.max_completion_tokens, self.logprobs, self.top_logprobs or 0)
        forced = self.forced_tools()
        if not forced:
            return params
        if params.constraint is not None:
            raise ValueError("a forced tool call cannot also take response_format or a grammar")
        # a call: {"name": <a forced tool>, "arguments": <its parameters' schema>}
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters,
                },
                "required": ["name", "arguments"],
            }
            for t in forced
        ]
        schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel_tool_calls:  # one or more calls, in a list
            schema = {"type": "array", "items": schema, "minItems": 1}
        return dataclasses.replace(params, constraint=Constraint("json_schema", json.dumps(schema)))

    @property
    def tools_on(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tools(self) -> list[Tool]:
        """The tools the reply must call one of (tool_choice required or a named function);
        [] when the model answers freely (no tools, none or auto)."""
        tools, choice = self.tools or [], self.tool_choice
        if not tools or choice in (None, "none", "auto"):
            if choice not in (None, "none", "auto"):
                raise ValueError("tool_choice needs tools")
            return []
        if choice == "required":
            return tools
        if isinstance(choice, dict) and choice.get("type") == "function":
            name = (choice.get("function") or {}).get("name")
            named = [t for t in tools if t.function.name == name]
            if not named:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            return named
        raise ValueError("tool_choice must be none, auto, required or {type: function, ...}")

    def chat(self, fmt: ToolFormat = FORMATS["json"]) -> list[dict[str, Any]]:
        """The messages for the chat template: with a template tool format, as the template
        takes them (the tools go beside: template_tools); with json, the tools listed in a
        system note."""
        if fmt.template:
            return [m.templated() for m in self.messages]
        messages: list[dict[str, Any]] = [
            {"role": m.role, "content": m.text()} for m in self.messages
        ]
        if self.tools_on:
            listing = "\n".join(
                f"- {t.function.name}: {t.function.description} Parameters (JSON schema): "
                f"{json.dumps(t.function.parameters)}"
                for t in self.tools or []
            )
            call = '{"name": <tool name>, "arguments": <its arguments>}'
            how = (
                f"with only a JSON list of calls, each {call}"
                if self.parallel_tool_calls
                else f"with only a JSON object {call}"
            )
            note = f"You can call these tools by replying {how}:\n" + listing
            if messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
            else:
                messages.insert(0, {"role": "system", "content": note})
        return messages

    def template_tools(self, fmt: ToolFormat) -> list[dict[str, Any]] | None:
        """The tools for a template tool format's chat template (None: none to render)."""
        if not (fmt.template and self.tools_on):
            return None
        return [t.model_dump(exclude_unset=True) for t in self.tools or []]  # as sent

    def tool_calls(
        self, text: str, fmt: ToolFormat = FORMATS["json"]
    ) -> tuple[str | None, list[dict[str, Any]]] | None:
        """(content, OpenAI tool calls) when the reply calls tools in fmt (a forced call, as
        its grammar writes it, always does); None: the reply is plain content."""
        if not self.tools_on:
            return None
        names = {t.function.name for t in self.tools or []}
        many = bool(self.parallel_tool_calls)
        found = (FORMATS["json"] if self.forced_tools() else fmt).calls(text, names, many)
        if found is None:
            return None
        content, calls = found
        return content or None, openai_calls(calls)


class GenerateSampling(_SamplingFields):
    temperature: float = Field(default=1.0, ge=0)
    max_new_tokens: int = Field(default=128, ge=1)


class GenerateRequest(_Body):
    """SGLang's /generate: `text` or `input_ids` with `sampling_params`, or the short form
    `prompt` with `max_tokens` (and optional top-level temperature)."""

    text: str | list[str] | None = None  # a list: a batch, answered with a list
    input_ids: list[int] | list[list[int]] | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=20)
    logprob_start_len: int = Field(default=-1, ge=-1)
    rid: str | None = None
    session_params: SessionParams | None = None  # the prompt continues the session's tokens

    @property
    def batched(self) -> bool:
        ids = self.input_ids
        return isinstance(self.text, list) or bool(ids and isinstance(ids[0], list))

    def id_lists(self) -> list[list[int]]:
        """input_ids as a list of prompts (one, unless batched)."""
        ids: Any = self.input_ids or []
        return [list(p) for p in ids] if self.batched else [list(ids)]

    def params(self) -> SamplingParams:
        sp = self.sampling_params
        updates: dict[str, Any] = {}
        if self.max_tokens is not None:
            updates["max_new_tokens"] = self.max_tokens
        if self.temperature is not None:
            updates["temperature"] = self.temperature
        if updates:
            sp = sp.model_copy(update=updates)
        start = self.logprob_start_len if self.return_logprob else -1
        return sp.to_params(
            sp.max_new_tokens,
            self.return_logprob,
            self.top_logprobs_num,
            logprob_start_len=start,
        )


class AbortRequest(_Body):
    rid: str


class TokenizeRequest(_Body):
    text: str
    add_special_tokens: bool = True


# Every POST route's body model: the handlers parse bodies themselves (any Content-Type), so
# FastAPI cannot see them; document_bodies puts them into the OpenAPI document.
BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/generate": GenerateRequest,
    "/abort_request": AbortRequest,
    "/tokenize": TokenizeRequest,
}


def document_bodies(openapi: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI document with each POST route of BODIES given its JSON request body."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        op = openapi.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    return openapi
