"""What the endpoints of one app share: the engine thread, its model's facts, settings and
metrics."""

from __future__ import annotations

import time

from fastapi import Request

from nanovllm_mlx.serving.engine_thread import EngineThread
from nanovllm_mlx.serving.errors import APIError
from nanovllm_mlx.serving.handle import RequestHandle
from nanovllm_mlx.serving.metrics import ServingMetrics
from nanovllm_mlx.serving.protocol import ModelCard
from nanovllm_mlx.serving.settings import ServerSettings
from nanovllm_mlx.serving.tools.registry import parser_for


class ServerState:
    def __init__(self, engine_thread: EngineThread, settings: ServerSettings):
        engine = engine_thread.start()
        self.engine_thread = engine_thread
        self.settings = settings
        self.metrics = ServingMetrics(engine_thread.snapshot)
        # Read-only after the engine is built, so safe to use off the engine thread.
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.max_model_len = engine.max_model_len
        self.model_name = settings.model_name or engine.model_name
        # The path the engine was loaded from also names the model.
        self.model_aliases = {self.model_name, engine.model_name}
        if engine.config.model:
            self.model_aliases.add(engine.config.model)
        self.created = int(time.time())
        # The tool-call format: --tool-call-parser, else the one the template writes.
        self.tool_parser = parser_for(self.tokenizer.chat_template, settings.tool_call_parser)
        added = self.tokenizer.tokenizer.get_added_tokens_decoder()
        # Special tokens by text: the detokenizer drops them, grammars name them by id.
        self.special_ids = {t.content: i for i, t in added.items() if t.special}

    def check_model(self, model: str | None) -> None:
        """A 404 model_not_found for a model this server does not serve, as OpenAI's."""
        if model is not None and model not in self.model_aliases:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def special_markers(self, texts: list[str]) -> dict[int, str]:
        """Token id -> text for those of texts that are special tokens (the detokenizer
        drops them from the output's text)."""
        return {self.special_ids[t]: t for t in texts if t in self.special_ids}

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def handle(self, request: Request, request_id: str, num_prompts: int = 1) -> RequestHandle:
        return RequestHandle(
            self.engine_thread,
            self.metrics,
            request,
            request_id,
            self.settings.request_timeout,
            num_prompts,
        )
