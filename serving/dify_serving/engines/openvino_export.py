"""Export a Hugging Face Llama-family causal LM to an OpenVINO IR for GenAI's
``ContinuousBatchingPipeline``, without optimum-intel.

Why not optimum-intel: its releases pin older transformers than the serving image's, so
it cannot be installed next to them. This module needs only torch, transformers and
openvino.

Approach
--------
1. Load the HF model in fp32 and hand its weights (shared, not copied) to the torch
   module that :func:`_build_decoder` builds: a minimal re-implementation of the Llama
   forward (embedding, RMSNorm, rotary embedding computed from ``position_ids``,
   q/k/v/o projections, GQA by unsqueeze-expand-reshape, a causal mask built from
   ``attention_mask``, ``scaled_dot_product_attention``, SiLU MLP, final norm, lm_head).
   It takes the KV cache as explicit tensors and returns the concatenated ("present")
   cache, so the traced graph has exactly the shape ``ReadValue -> Gather(beam_idx) ->
   Concat(past, k_rot) -> [Unsqueeze -> Broadcast -> Reshape] ->
   ScaledDotProductAttention`` that OpenVINO's ``SDPAToPagedAttention``
   (``StateManagementPattern``), run by the pipeline, matches once the model is
   stateful. Its logits equal transformers' bit for bit in fp32.
2. ``openvino.convert_model`` traces it; the inputs and outputs are named like
   optimum-intel's (``input_ids``, ``attention_mask``, ``position_ids``,
   ``past_key_values.N.key/value``; ``logits``, ``present.N.key/value``).
3. The model is made stateful as optimum-intel's ``patch_stateful`` does: a ``beam_idx``
   parameter with a Gather on every cache input (``fuse_cache_reorder``),
   ``apply_make_stateful_transformation`` on the cache input/output pairs, and a
   zero-filled initializer of the right batch for every ReadValue
   (``build_state_initializer``).
4. The IR is saved with fp32 weights (``compress_to_fp16=False``), next to
   ``config.json``, ``generation_config.json`` and ``openvino_export.json`` (source and
   revision). No OpenVINO tokenizer is written: ``ContinuousBatchingPipeline`` builds
   without one when requests are given as token ids (``add_request(id, ov.Tensor(ids),
   config)``); string prompts and stop strings would need ``openvino_tokenizer.xml``.
   Unlike optimum-intel's IR there is no ``runtime_options`` rt_info, so pass
   ``KV_CACHE_PRECISION`` (and ``INFERENCE_PRECISION_HINT``) explicitly.

Graph contract (what ``ContinuousBatchingPipeline`` sees before it converts the model):

* inputs ``input_ids`` i64 [B, T], ``attention_mask`` i64 [B, P+T], ``position_ids`` i64
  [B, T], ``beam_idx`` i32 [B];
* one output ``logits`` f32 [B, T, vocab];
* 2 x num_layers states with cache layout [B, num_kv_heads, P, head_dim] (static heads and
  head_dim), one ScaledDotProductAttention per layer (4 inputs, default scale);
* ``attention_mask`` only feeds the SDPA masks, so the pipeline can drop it; the
  rotary embedding reads only ``position_ids``.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v
biases), rope types whose frequencies do not depend on the sequence length (default,
linear, llama3, yarn). Sliding-window attention shorter than the model's context, other
architectures and dynamic rope types raise :class:`UnsupportedModel`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

__all__ = ["EXPORT_VERSION", "SUPPORTED_MODEL_TYPES", "UnsupportedModel", "export"]

#: Part of the converted models' cache key (openvino_textgen.cache_dir): bump it when the
#: graph this module writes changes, so replicas convert again instead of reading an old IR.
EXPORT_VERSION = 1

#: HF ``model_type`` values whose forward the exporter's torch decoder reproduces.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})

#: Rope types whose ``inv_freq`` is fixed at load time (no sequence-length dependence).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


class UnsupportedModel(ValueError):
    """The model's architecture or configuration is outside what this exporter handles."""


def _check_config(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported by the OpenVINO exporter "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type {rope_type!r} is not supported")
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window is not None and window < config.max_position_embeddings:
        raise UnsupportedModel(
            f"sliding-window attention ({window} < {config.max_position_embeddings}) "
            "is not supported"
        )


def _build_decoder(hf_model: Any) -> tuple[Any, int, int]:
    """``(decoder, num_kv_heads, head_dim)``: a torch module with the forward described in
    the module docstring, holding ``hf_model``'s weights (shared, not copied)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    config = hf_model.config
    hidden = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    eps = float(config.rms_norm_eps)
    rotary = hf_model.model.rotary_emb
    hf_state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    qkv_bias = "layers.0.self_attn.q_proj.bias" in hf_state
    o_bias = "layers.0.self_attn.o_proj.bias" in hf_state
    mlp_bias = "layers.0.mlp.down_proj.bias" in hf_state

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            variance = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + eps))

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def repeat_kv(x: torch.Tensor) -> torch.Tensor:
        # Unsqueeze -> Broadcast -> Reshape: the GQA shape StateManagementPattern expects.
        rep = n_heads // n_kv
        if rep == 1:
            return x
        b, _, s, _ = x.shape
        x = x.unsqueeze(2).expand(b, n_kv, rep, s, head_dim)
        return x.reshape(b, n_heads, s, head_dim)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
            self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)

        def forward(
            self,
            x: torch.Tensor,
            cos: torch.Tensor,
            sin: torch.Tensor,
            mask: torch.Tensor,
            past_k: torch.Tensor,
            past_v: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, n_heads, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, n_kv, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, n_kv, head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            out = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)
            out = out.transpose(1, 2).reshape(b, t, n_heads * head_dim)
            return self.o_proj(out), k, v

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            inter = config.intermediate_size
            self.gate_proj = nn.Linear(hidden, inter, bias=mlp_bias)
            self.up_proj = nn.Linear(hidden, inter, bias=mlp_bias)
            self.down_proj = nn.Linear(inter, hidden, bias=mlp_bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = MLP()

    class Decoder(nn.Module):
        """forward(input_ids, attention_mask, position_ids, *past) ->
        (logits, present.0.key, present.0.value, ...)."""

        inv_freq: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(config.num_hidden_layers))
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
            self.register_buffer("inv_freq", torch.empty(head_dim // 2))
            self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            t = input_ids.shape[1]
            s = attention_mask.shape[1]
            x = self.embed_tokens(input_ids)

            freqs = position_ids[..., None].float() * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * self.attention_scaling).unsqueeze(1)
            sin = (emb.sin() * self.attention_scaling).unsqueeze(1)

            # [B, 1, T, S] additive mask: causal (query i sits at S - T + i) and padding.
            q_pos = torch.arange(t, dtype=torch.int64) + (s - t)
            k_pos = torch.arange(s, dtype=torch.int64)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (
                attention_mask[:, None, None, :] > 0
            )
            mask = torch.where(
                allowed,
                torch.zeros((), dtype=x.dtype),
                torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype),
            )

            presents: list[torch.Tensor] = []
            for i, module in enumerate(self.layers):
                layer = cast(Layer, module)
                h, k, v = layer.self_attn(
                    layer.input_layernorm(x), cos, sin, mask, past[2 * i], past[2 * i + 1]
                )
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                presents += [k, v]
            logits = self.lm_head(self.norm(x))
            return (logits, *presents)

    with torch.device("meta"):  # no random init: every tensor is assigned below
        decoder = Decoder()
    state = {k: v for k, v in hf_state.items() if "rotary_emb" not in k}
    if "lm_head.weight" not in state:  # tied embeddings
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state["inv_freq"] = rotary.inv_freq.detach().float().clone()
    missing, unexpected = decoder.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedModel(
            f"weights do not match the Llama layout: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return decoder.eval(), n_kv, head_dim


def _make_stateful(ov_model: Any, num_layers: int) -> None:
    """optimum-intel's ``patch_stateful`` for decoders: beam_idx + Gather on each cache
    input, cache inputs/outputs turned into states, ReadValue initializers of batch B."""
    import numpy as np
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    kv_in = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]

    input_ids = ov_model.input("input_ids")
    beam_idx = opset13.parameter(
        name="beam_idx",
        dtype=ov.Type.i32,
        shape=ov.PartialShape([input_ids.get_partial_shape()[0]]),
    )
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in kv_in:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    ov_model.validate_nodes_and_infer_types()

    apply_make_stateful_transformation(ov_model, dict(zip(kv_in, kv_out, strict=True)))

    batch = opset13.gather(
        opset13.shape_of(input_ids, output_type="i64"), opset13.constant([0]), opset13.constant(0)
    )
    for op in ov_model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims: list[Any] = [dim.min_length for dim in op.get_output_partial_shape(0)]
        dims[0] = batch
        parts = [
            opset13.constant(np.array([d], dtype=np.int64)) if isinstance(d, int) else d
            for d in dims
        ]
        zero = opset13.constant(0.0, dtype=op.get_output_element_type(0))
        op.set_arguments([opset13.broadcast(zero, opset13.concat(parts, axis=0))])
    ov_model.validate_nodes_and_infer_types()


def export(model_path: str, out_dir: Path, *, revision: str | None = None) -> None:
    """Writes openvino_model.xml/.bin (fp32 weights, stateful KV cache with beam_idx, the
    inputs ContinuousBatchingPipeline expects), config.json and generation_config.json
    into out_dir.

    ``model_path`` is a local folder or a hub id (resolved by transformers, so offline mode
    applies). Raises :class:`UnsupportedModel` for architectures the exporter cannot
    reproduce. The caller makes the write atomic (a scratch folder renamed into place).
    """
    import openvino as ov
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_path, revision=revision)
    _check_config(config)
    hf_model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=revision, dtype=torch.float32
    ).eval()

    decoder, n_kv, head_dim = _build_decoder(hf_model)
    num_layers = config.num_hidden_layers
    batch, past_len, new_len = 2, 3, 4
    example: list[torch.Tensor] = [
        torch.randint(0, config.vocab_size, (batch, new_len), dtype=torch.int64),
        torch.ones(batch, past_len + new_len, dtype=torch.int64),
        torch.arange(past_len, past_len + new_len, dtype=torch.int64).expand(batch, -1).clone(),
    ]
    example += [torch.zeros(batch, n_kv, past_len, head_dim) for _ in range(2 * num_layers)]
    shapes: list[tuple[list[int], ov.Type]] = [
        ([-1, -1], ov.Type.i64),
        ([-1, -1], ov.Type.i64),
        ([-1, -1], ov.Type.i64),
    ]
    shapes += [([-1, n_kv, -1, head_dim], ov.Type.f32)] * (2 * num_layers)

    with torch.no_grad():
        ov_model = ov.convert_model(
            decoder,
            example_input=tuple(example),
            input=[(ov.PartialShape(shape), dtype) for shape, dtype in shapes],
        )
    del decoder

    in_names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    for i in range(num_layers):
        in_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        out_names += [f"present.{i}.key", f"present.{i}.value"]
    for port, name in zip(ov_model.inputs, in_names, strict=True):
        port.get_tensor().set_names({name})
        port.get_node().set_friendly_name(name)
    for port, name in zip(ov_model.outputs, out_names, strict=True):
        port.get_tensor().set_names({name})

    _make_stateful(ov_model, num_layers)

    scratch = Path(out_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, scratch / "openvino_model.xml", compress_to_fp16=False)
    config.save_pretrained(scratch)
    try:
        generation = GenerationConfig.from_pretrained(model_path, revision=revision or "main")
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(scratch)
    (scratch / "openvino_export.json").write_text(
        json.dumps({"source": str(model_path), "revision": revision, "weights": "fp32"}) + "\n"
    )
