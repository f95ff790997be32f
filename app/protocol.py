"""What the OpenAI endpoints share: the sampling fields, usage, the model list, and the checks
that need the model. Each endpoint's own schemas live in its module (`completions`, `chat`).

Follows OpenAI where its reference is explicit (``model`` required, ``max_tokens``
defaults to 16, penalties in [-2, 2], ``best_of`` cannot stream) and vLLM where it is
silent (``max_tokens: 0`` allowed without ``echo``, ``logprobs`` up to 20, ``top_k``
of -1 or 0 disables it, ``min_tokens``, ``ignore_eos``, ``repetition_penalty``,
``suffix`` rejected). Unknown fields are ignored, as both do. Integers are strict:
``1.0``, ``true`` and ``"1"`` are not integers. ``null`` means "the default" for
every field that has one (OpenAI documents these as nullable).

Checks that need the model (token ids inside the vocabulary, prompt plus
``max_tokens`` within the context) are helpers the server calls after tokenizing.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Iterable, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.errors import BadRequest
from app.sampling import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_TOKEN_ID_KEY = re.compile(r"[0-9]{1,18}")


def random_id(prefix: str) -> str:
    """Returns an unguessable id such as ``cmpl-9f86d081884c7d659a2feaa0c55ad015``.

    Args:
        prefix: The id's prefix, without the dash.

    Returns:
        ``prefix`` + ``-`` + 32 hex digits from the OS's secure random source.
    """
    return f"{prefix}-{secrets.token_hex(16)}"


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is used; other keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    include_usage: Optional[StrictBool] = False


class SamplingRequest(BaseModel):
    """The fields every generation endpoint shares (completions, chat): the model, the token
    budget, sampling, penalties, stop conditions, streaming.

    Field order matters: a validator may read fields defined above it (a subclass's fields come
    after these).
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(16, ge=0)  # None: as many as the context holds
    min_tokens: StrictInt = Field(0, ge=0)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = None  # None, -1 or 0: disabled
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[StrictStr] = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    use_beam_search: StrictBool = False  # vLLM's: `n` beams, best first
    length_penalty: StrictFloat = 1.0
    early_stopping: Union[StrictBool, Literal["never"]] = False

    @model_validator(mode="before")
    @classmethod
    def _beam_search_is_greedy(cls, data: Any) -> Any:
        # beam search ranks by the model's own log-probabilities: its temperature defaults to 0
        if isinstance(data, dict) and data.get("use_beam_search") is True and data.get("temperature") is None:
            data = {**data, "temperature": 0.0}
        return data

    @field_validator(
        "min_tokens", "temperature", "top_p", "n", "stream", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "ignore_eos", "skip_special_tokens",
        "include_stop_str_in_output", "use_beam_search", "length_penalty", "early_stopping",
        mode="before",
    )
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must be <= max_tokens ({max_tokens})")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {value}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop", mode="plain")
    @classmethod
    def _check_stop(cls, value: Any) -> Optional[Union[str, list[str]]]:
        items = [value] if isinstance(value, str) else value
        if value is None:
            return None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Optional[dict[str, float]]:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("logit_bias must be an object mapping token ids to biases")
        checked = {}
        for key, bias in value.items():
            if not isinstance(key, str) or not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool):
                raise ValueError(f"logit_bias[{key!r}] must be a number, got {bias!r}")
            if not -100.0 <= bias <= 100.0:  # also rejects NaN
                raise ValueError(f"logit_bias[{key!r}] must be in [-100, 100], got {bias}")
            checked[key] = float(bias)
        return checked

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` with token-id keys as ints (empty when not given)."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list (empty when not given)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def effective_top_k(self) -> Optional[int]:
        """``top_k`` for sampling: None when disabled (None, -1 or 0)."""
        return self.top_k if self.top_k is not None and self.top_k > 0 else None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_beam_search(self, max_width: int, **others: Any) -> None:
        """Refuses what beam search does not take (as vLLM does: streaming, sampling), and what
        it does not take here (penalties, log-probabilities, `others`: field -> value given).

        Raises:
            BadRequest: naming the first such field.
        """
        if not self.use_beam_search:
            return
        refused = {"stream": self.stream, "temperature": self.temperature > 0, "n": self.n > max_width,
                   "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                   "repetition_penalty": self.repetition_penalty != 1, "logit_bias": bool(self.logit_bias),
                   "max_tokens": self.max_tokens == 0, **others}
        for param, bad in refused.items():
            if bad:
                what = (f"n (the beam width) must be at most {max_width} on this server" if param == "n"
                        else f"{param} is not supported with use_beam_search")
                raise BadRequest(what, param=param)

    def sampling_params(self, max_tokens: int, eos_token_ids: tuple[int, ...], logprobs: Optional[int] = None,
                        rank_by_logprob: bool = False) -> SamplingParams:
        """The engine's parameters for one prompt of this request.

        Args:
            max_tokens: the prompt's token budget (see `resolve_max_tokens`).
            eos_token_ids: the model's end-of-sequence ids (they stop it unless `ignore_eos`).
            logprobs: alternatives to report per token (None: no log-probabilities).
            rank_by_logprob: the sampled tokens' log-probabilities rank candidates (`best_of`).
        """
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.effective_top_k,
            min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias_ids, seed=self.seed, logprobs=logprobs, rank_by_logprob=rank_by_logprob,
            ignore_eos=self.ignore_eos, stop=tuple(self.stop_list),
            stop_token_ids=() if self.ignore_eos else eos_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            beam_width=self.n if self.use_beam_search else 0, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping)


def validate_token_ids(ids: Iterable[Any], vocab_size: int, param: str = "prompt") -> None:
    """Checks token ids against the model's vocabulary.

    Args:
        ids: Token ids, or lists of them (one level of nesting).
        vocab_size: Number of token ids the model knows; valid ids are 0..vocab_size-1.
        param: The request field the ids come from (``prompt``, ``logit_bias``).

    Raises:
        BadRequest: An id is not an integer in ``[0, vocab_size)``.
    """
    for item in ids:
        if isinstance(item, (list, tuple)):
            validate_token_ids(item, vocab_size, param)
            continue
        if not is_int(item) or not 0 <= item < vocab_size:
            raise BadRequest(
                f"{param} contains token id {item!r} outside the vocabulary "
                f"(valid ids are 0..{vocab_size - 1})",
                param=param,
            )


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: Optional[int], max_model_len: int) -> int:
    """Checks a prompt against the context length and returns the token budget.

    Args:
        num_prompt_tokens: Length of the tokenized prompt.
        max_tokens: The request's ``max_tokens``; None means as many as fit.
        max_model_len: The model's context length.

    Returns:
        How many tokens may be generated.

    Raises:
        BadRequest: With code ``context_length_exceeded`` when the prompt plus
            ``max_tokens`` exceeds the context (or the prompt alone fills it when
            ``max_tokens`` is None).
    """
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {max_model_len} tokens, "
                f"but the prompt has {num_prompt_tokens} tokens. Please shorten the prompt.",
                param="prompt", code="context_length_exceeded",
            )
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        """Builds usage from the two counts, with their total."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "stagewise"
    root: Optional[str] = None
    parent: Optional[str] = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    """The ``GET /v1/models`` answer."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
