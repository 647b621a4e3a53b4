"""The OpenAI API's tool-calling bodies: tools and calls in requests, calls in answers and
in stream deltas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="The arguments as a JSON object.")


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema.")
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


# Responses ---------------------------------------------------------------------------------


def omit_none(self: BaseModel, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
    return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    _omit_none = model_serializer(mode="wrap")(omit_none)


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    _omit_none = model_serializer(mode="wrap")(omit_none)
