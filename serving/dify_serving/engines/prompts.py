"""Prompts to token ids and the context budget: what every generation engine shares.

Light on purpose (no torch): vLLM's engine brings its own CUDA torch and imports this, not
textgen. Each engine gives the model the same token ids for the same request and refuses
the same over-long prompts.
"""

from __future__ import annotations

from typing import Any

from dify_serving.engines.protocol import EngineError, GenerationRequest, InputTooLong


def encode(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids of a prompt, or of a conversation through the model's chat template (a
    plain `role: content` transcript for a model without one)."""
    messages = request.messages
    if messages:
        if tokenizer.chat_template:
            from jinja2 import TemplateError

            try:
                chat: Any = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except TemplateError as exc:  # the template's own words (raise_exception)
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise EngineError(
                    422,
                    "invalid_request",
                    f"messages: the model's chat template refused them: {reason}",
                ) from None
            return [int(i) for i in chat]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    else:
        text = request.prompt or ""
    if not text:
        raise EngineError(422, "invalid_request", "prompt: must not be empty")
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def budget(name: str, max_context: int, prompt_tokens: int, max_tokens: int) -> int:
    """New tokens a request may have: its max_tokens, within what the context leaves."""
    room = max_context - prompt_tokens
    if room < 1:
        raise InputTooLong(
            f"prompt has {prompt_tokens} tokens; {name} has a context of "
            f"{max_context} tokens (prompt plus completion)"
        )
    return min(max_tokens, room)
