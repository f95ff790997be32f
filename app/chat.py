"""`POST /v1/chat/completions`: OpenAI's chat, with vLLM's extras where OpenAI is silent.

The messages are rendered with the checkpoint's own chat template (`add_generation_prompt`, vLLM's
`continue_final_message` and `chat_template_kwargs`) and the text is tokenized without adding
special tokens a second time. `developer` messages are given to the template as `system` ones
(OpenAI's newer name for the same thing; templates know `system`). Tools, function calling,
structured output and non-text content are not supported yet: each gets a 400 that says so.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator

from app.errors import BadRequest, parse_json_body
from app.generation import Generation, ModelInfo, TokenLogprob
from app.protocol import MAX_LOGPROBS, SamplingRequest, UsageInfo, random_id, resolve_max_tokens
from app.serving import Serving, sse

ROLES = ("system", "developer", "user", "assistant")
# Template arguments a request may not set through `chat_template_kwargs`: the server sets them.
RESERVED_TEMPLATE_ARGS = {"messages", "conversation", "tools", "documents", "chat_template", "tokenize",
                          "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
                          "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"}


def _message(i: int, message: Any) -> dict:
    """One message as the template gets it: role, text content, name if given."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object with `role` and `content`")
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
        raise ValueError(f"{where}: tool and function calling are not supported yet")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                 f"are supported; got {kind or type(part).__name__!r}")
            texts.append(part["text"])
        content = "\n".join(texts)  # as vLLM joins text parts
    elif not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if message.get("name") is not None:
        if not isinstance(message["name"], str):
            raise ValueError(f"{where}.name must be a string")
        out["name"] = message["name"]
    return out


def check_messages(value: Any) -> list[dict]:
    """The messages as the template gets them.

    Raises:
        ValueError: not a non-empty list of messages with known roles and text content.
    """
    if not isinstance(value, list):
        raise ValueError("messages must be a list of messages")
    if not value:
        raise ValueError("messages must not be empty")
    return [_message(i, message) for i, message in enumerate(value)]


def check_template_kwargs(value: Optional[dict]) -> Optional[dict]:
    """Raises ValueError when `chat_template_kwargs` sets what the server sets."""
    reserved = sorted(RESERVED_TEMPLATE_ARGS & set(value or {}))
    if reserved:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
    return value


class ChatRequest(SamplingRequest):
    """A ``POST /v1/chat/completions`` body. With neither ``max_completion_tokens`` nor
    ``max_tokens``, the answer may fill the rest of the context (as OpenAI and vLLM do)."""

    max_tokens: Optional[StrictInt] = Field(None, ge=0)  # the older name of max_completion_tokens
    messages: list[dict]
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[Any] = None
    tools: Optional[Any] = None
    functions: Optional[Any] = None
    chat_template: Optional[Any] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    @field_validator("logprobs", "add_generation_prompt", "continue_final_message", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("messages", mode="plain")
    @classmethod
    def _check_messages(cls, value: Any) -> list[dict]:
        return check_messages(value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: Optional[int], info) -> Optional[int]:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else value
        if value is not None and kind != "text":
            raise ValueError(f"response_format {kind!r} is not supported yet; only \"text\"")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Any, info) -> Any:
        if value:  # an empty list asks for nothing
            raise ValueError(f"{info.field_name} are not supported yet")
        return None

    @field_validator("chat_template")
    @classmethod
    def _no_request_template(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("a request cannot supply its chat template; the model's own is used")
        return None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_args(cls, value: Optional[dict]) -> Optional[dict]:
        return check_template_kwargs(value)

    @property
    def budget(self) -> Optional[int]:
        """The token budget asked for: ``max_completion_tokens``, else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class LogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[LogprobEntry]] = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM: the stop string hit


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice] = Field(default_factory=list)
    usage: Optional[UsageInfo] = None


def render(model: ModelInfo, messages: list[dict], add_generation_prompt: bool = True,
           continue_final_message: bool = False, template_kwargs: Optional[dict] = None) -> list[int]:
    """The token ids of the conversation (checked messages) as the model's chat template writes it."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest(f"The model `{model.name}` has no chat template: use /v1/completions", param="messages",
                         code="no_chat_template")
    if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise BadRequest("continue_final_message needs add_generation_prompt: false and an assistant message "
                         "last", param="continue_final_message")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **(template_kwargs or {}))
    except (TemplateError, ValueError, TypeError) as exc:  # the template refused these messages
        raise BadRequest(f"the chat template cannot render these messages: {exc}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False).input_ids  # the template wrote the special tokens
    if not ids:
        raise BadRequest("the rendered conversation is empty (no tokens)", param="messages")
    return ids


def _top(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's `logprobs.content` of a run of generated tokens."""
    return ChatLogprobs(content=[LogprobEntry(**_top(e.text, e.logprob),
                                              top_logprobs=[_top(text, value) for _, text, value in e.top or []])
                                 for e in entries])


def add_routes(app: FastAPI, serving: Serving) -> None:
    model = serving.model

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_json_body(request, ChatRequest)
        adapter = serving.admit(body.model)
        body.check_beam_search(serving.engine.config.beam_width_cap, logprobs=body.logprobs)
        ids = render(model, body.messages, body.add_generation_prompt, body.continue_final_message,
                     body.chat_template_kwargs)
        if body.budget is not None and body.min_tokens > body.budget:
            raise BadRequest(f"min_tokens ({body.min_tokens}) must be <= max_completion_tokens ({body.budget})",
                             param="min_tokens")
        max_tokens = resolve_max_tokens(len(ids), body.budget, model.max_model_len)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, model.eos_token_ids, logprobs)
        generation = Generation(serving.engine, model, [ids], [params], body.n, body.n, body.seed,
                                id_prefix="chatcmpl", adapter=adapter)
        meta = generation.meta
        async def whole() -> dict:
            choices = [ChatChoice(index=i, message=ChatMessage(content=state.text),
                                  logprobs=chat_logprobs(state.logprobs) if body.logprobs else None,
                                  finish_reason=state.finish_reason, stop_reason=state.stop_reason)
                       for i, state in enumerate(await generation.run())]
            return ChatCompletionResponse(**meta, choices=choices, usage=generation.usage()).model_dump()

        async def lines():
            for i in range(len(generation.states)):
                yield sse(ChatCompletionChunk(**meta, choices=[
                    ChatStreamChoice(index=i, delta={"role": "assistant", "content": ""})]))
            async for delta in generation.deltas():
                yield sse(ChatCompletionChunk(**meta, choices=[ChatStreamChoice(
                    index=delta.index, delta={"content": delta.text} if delta.text else {},
                    logprobs=chat_logprobs(delta.logprobs) if body.logprobs and delta.logprobs else None,
                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)]))
            if body.include_usage:
                yield sse(ChatCompletionChunk(**meta, usage=generation.usage()))
            yield "data: [DONE]\n\n"

        return await serving.answer(request, generation, body.stream, lines, whole)
