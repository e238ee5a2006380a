"""The wire format: OpenAI's embeddings request and response, the Qwen3 extensions, and
errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request that fails with an HTTP status and an OpenAI-shaped body.

    Args:
        status: the HTTP status.
        message: one line: what is wrong and how to fix it.
        param: the request field at fault (``input[3]``, ``dimensions``).
        code: a short machine-readable reason (``model_not_found``, ``queue_full``).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class VLItem(BaseModel):
    """One multimodal input of a Qwen3-VL bundle: any of text, an image, a video.

    ``image`` and ``video`` are ``data:`` URIs, or file paths under the directory the operator
    allowed with ``--allow-files``; remote URLs are refused.
    """

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = None
    image: StrictStr | None = None
    video: StrictStr | None = None


_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_VL_ITEM = {"type": "object", "additionalProperties": False,
            "properties": {k: {"type": ["string", "null"]} for k in ("text", "image", "video")}}
INPUT_SCHEMA = {
    "description": "A string, a list of strings, a token-id list, a list of token-id lists, "
                   "or (Qwen3-VL) a list of strings and {text, image, video}",
    "anyOf": [_TEXT, {"type": "array", "minItems": 1, "items": _TEXT}, _IDS,
              {"type": "array", "minItems": 1, "items": _IDS},
              {"type": "array", "minItems": 1, "items": {"anyOf": [_TEXT, _VL_ITEM]}}]}
"""What ``input`` may be, for the OpenAPI document (:func:`parse_input` enforces it, naming
the offending index, which a generic validator could not)."""
InputField = Annotated[Any, WithJsonSchema(INPUT_SCHEMA)]
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}
"""An instruction has a non-space character (blank ones are a 400: omit the field instead)."""


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields plus ``input_type``, ``instruction``, ``truncate``.

    ``input`` is checked by :func:`parse_input` so that errors name the offending index.
    """

    model_config = ConfigDict(extra="forbid")

    input: InputField
    model: StrictStr | None = Field(None, description="Must be the served model name.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: JsonInt | None = Field(None, description="Matryoshka width: truncated, then "
                                         "L2-normalized again.")
    user: StrictStr | None = None
    input_type: Literal["query", "document"] | None = Field(
        None, description="query: the instruction template is applied; document (default): none.")
    instruction: StrictStr | None = Field(
        None, description="The task of a query (text) or the system instruction (Qwen3-VL).",
        json_schema_extra=NOT_BLANK)
    truncate: StrictBool = Field(True, description="Cut inputs longer than the token limit "
                                 "(keeping the end token); false: refuse them with 413.")


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: what the model would see, instruction and end token included."""

    model_config = ConfigDict(extra="forbid")

    input: InputField
    model: StrictStr | None = None
    input_type: Literal["query", "document"] | None = None
    instruction: StrictStr | None = Field(None, json_schema_extra=NOT_BLANK)
    truncate: StrictBool = True


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The response, as OpenAI sends it (documents the API; responses are built directly)."""

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


Input = str | list[int] | dict[str, Any]


def parse_input(raw: Any, *, max_inputs: int) -> list[Input]:
    """Normalize ``input`` to a list of items: strings, token-id lists or VL item dicts.

    Raises:
        ApiError: 400 naming the index of a bad item; 413 for more than ``max_inputs`` items.
    """
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_id(x) for x in raw):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ApiError(400, f"input must be a string, a list of strings or token-id lists, got "
                       f"{type(raw).__name__}", param="input", code="invalid_input")
    if not items:
        raise ApiError(400, "input is an empty list; pass at least one string",
                       param="input", code="invalid_input")
    if len(items) > max_inputs:
        raise ApiError(413, f"input has {len(items)} items, above this server's limit of "
                       f"{max_inputs} per request; split it into several requests",
                       param="input", code="too_many_inputs")
    kinds = set()
    for i, item in enumerate(items):
        kinds.add(_check_item(item, i))
    if "ids" in kinds and len(kinds) > 1:
        raise ApiError(400, "input mixes token-id lists with strings or objects; send one kind "
                       "per request", param="input", code="invalid_input")
    return [VLItem.model_validate(x).model_dump(exclude_none=True) if isinstance(x, dict)
            else [int(t) for t in x] if isinstance(x, list) else x for x in items]


def _is_id(x: Any) -> bool:
    """An integer as JSON Schema counts them: ``7`` and ``7.0``, not ``true``."""
    if isinstance(x, float):
        return x.is_integer()
    return isinstance(x, int) and not isinstance(x, bool)


def _integral(value: Any) -> Any:
    """``7.0`` as ``7`` (JSON Schema's integers include integral floats); the rest as given."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[StrictInt, BeforeValidator(_integral), WithJsonSchema({"type": "integer"})]
"""A strict integer that also takes integral floats (``"7"`` and ``true`` stay refused)."""


def _check_item(item: Any, i: int) -> str:
    where = f"input[{i}]"
    if isinstance(item, str):
        if not item:
            raise ApiError(400, f"{where} is an empty string; drop it or send real text",
                           param=where, code="invalid_input")
        return "text"
    if isinstance(item, list):
        if not item or not all(_is_id(x) for x in item):
            raise ApiError(400, f"{where} must be a non-empty list of integer token ids",
                           param=where, code="invalid_input")
        return "ids"
    if isinstance(item, dict):
        try:
            VLItem.model_validate(item)
        except ValueError as e:
            first = str(e).splitlines()[1:3]
            raise ApiError(400, f"{where} is not a valid {{text, image, video}} object: "
                           f"{' '.join(s.strip() for s in first)}", param=where,
                           code="invalid_input") from None
        return "object"
    raise ApiError(400, f"{where} is a {type(item).__name__}; send strings, token-id lists "
                   "or {text, image, video} objects", param=where, code="invalid_input")


def embeddings_body(vectors: np.ndarray, *, encoding_format: str, model: str,
                    tokens: int) -> dict[str, Any]:
    """The response body; ``base64`` is the little-endian float32 bytes of each row."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        data: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        data = rows.tolist()
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e}
                     for i, e in enumerate(data)],
            "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
