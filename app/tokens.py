"""`POST /tokenize` and `POST /detokenize`, as vLLM serves them.

`/tokenize` takes a `prompt` (special tokens added, as completions adds them, unless
`add_special_tokens: false`) or chat `messages` (rendered with the model's chat template, as chat
renders them; no special tokens added a second time unless `add_special_tokens: true`), and answers
the token ids, their count and the model's context length. `/detokenize` takes token ids and
answers the text. `model` may be left out; when given it must be the served model's name or one of
its LoRA adapters' (which share its tokenizer).
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, field_validator, model_validator

from app.chat import check_messages, check_template_kwargs, render
from app.errors import BadRequest, NotFound, parse_json_body
from app.protocol import is_int, validate_token_ids


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[dict]] = None
    add_special_tokens: Optional[StrictBool] = None  # None: True for a prompt, False for messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: StrictBool = False

    @field_validator("messages", mode="plain")
    @classmethod
    def _check_messages(cls, value: Any) -> Optional[list[dict]]:
        return None if value is None else check_messages(value)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_args(cls, value: Optional[dict]) -> Optional[dict]:
        return check_template_kwargs(value)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    tokens: list[Any]


def add_routes(app: FastAPI, serving) -> None:
    model = serving.model

    def check_model(name: Optional[str]) -> None:
        if name is not None and model.adapter_index(name) is None:  # the model or one of its LoRA adapters
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await parse_json_body(request, TokenizeRequest)
        check_model(body.model)
        if body.prompt is not None:
            ids = model.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False).input_ids
        else:
            ids = render(model, body.messages, body.add_generation_prompt, body.continue_final_message,
                         body.chat_template_kwargs)
            if body.add_special_tokens:
                ids = model.tokenizer.build_inputs_with_special_tokens(ids)
        answer = {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            answer["token_strs"] = model.tokenizer.convert_ids_to_tokens(ids)
        return answer

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await parse_json_body(request, DetokenizeRequest)
        check_model(body.model)
        if not all(is_int(token) for token in body.tokens):
            raise BadRequest("tokens must be a list of token ids", param="tokens")
        validate_token_ids(body.tokens, model.vocab_size, param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}
