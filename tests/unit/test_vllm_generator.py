"""vLLM as the generation engine on CUDA: the spec → engine mapping, without vLLM.

vLLM cannot run on these machines (CUDA only, and its own CUDA build of torch), so the
mapping is tested three ways: each spec field lands in the right `AsyncEngineArgs` and
`SamplingParams` keyword; every keyword we pass is a real field of the pinned release
(the names below, read from its source); and the engine runs end to end on a stand-in
`vllm` module whose `AsyncLLM` streams `RequestOutput`-like objects, cancellation and
shutdown included. Where vLLM is installed, the names are checked against it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dify_serving.engines import base
from dify_serving.engines.protocol import EngineError, GenerationRequest, InputTooLong
from dify_serving.engines.vllm_generator import (
    VllmGenerationEngine,
    engine_args,
    finish_reason,
    sampling_kwargs,
)
from dify_serving.specs import DifyModelSpec

#: The public fields of `EngineArgs` and `AsyncEngineArgs` (`enable_log_requests`) in
#: vLLM 0.33.0, read from `vllm/engine/arg_utils.py` of the wheel
#: (`pip download --no-deps vllm==0.33.0`). Bumping the pin: refresh this list from the
#: new release (`test_the_field_lists_match_the_installed_vllm` does where vLLM is).
ENGINE_ARGS_FIELDS = frozenset(
    """
    model enable_return_routed_experts return_sampling_mask model_weights served_model_name
    tokenizer hf_config_path runner convert skip_tokenizer_init enable_prompt_embeds
    tokenizer_mode trust_remote_code allowed_local_media_path allowed_media_domains
    download_dir safetensors_load_strategy safetensors_prefetch_num_threads
    safetensors_prefetch_block_size load_format config_format dtype kv_cache_dtype seed
    max_model_len cudagraph_capture_sizes max_cudagraph_capture_size ir_op_priority
    distributed_executor_backend pipeline_parallel_size master_addr master_port nnodes
    node_rank distributed_timeout_seconds cpu_distributed_timeout_seconds numa_bind
    numa_bind_nodes numa_bind_cpus device_ids tensor_parallel_size
    prefill_context_parallel_size decode_context_parallel_size dcp_comm_backend
    dcp_q_replicate dcp_kv_cache_interleave_size cp_kv_cache_interleave_size
    data_parallel_size data_parallel_rank data_parallel_start_rank data_parallel_size_local
    data_parallel_address data_parallel_rpc_port data_parallel_hybrid_lb
    data_parallel_external_lb data_parallel_multi_port_external_lb data_parallel_backend
    enable_hc_sp enable_expert_parallel enable_batch_sharded_sampling
    enable_ep_weight_filter moe_backend linear_backend sparse_indexer_topk_backend
    all2all_backend enable_elastic_ep elastic_ep_max_dp_size enable_dbo ubatch_size
    dbo_decode_token_threshold dp_sync_interval dbo_prefill_token_threshold
    disable_nccl_for_dp_synchronization eplb_config enable_eplb expert_placement_strategy
    max_parallel_loading_workers block_size enable_prefix_caching prefix_caching_hash_algo
    prefix_cache_retention_interval disable_sliding_window disable_cascade_attn
    offload_backend cpu_offload_gb cpu_offload_params offload_group_size
    offload_num_in_group offload_prefetch_step offload_params gpu_memory_utilization
    kv_cache_memory_bytes max_num_batched_tokens max_num_scheduled_tokens
    long_prefill_token_threshold long_prefill_token_threshold_adaptive max_num_seqs
    max_num_active_seqs max_num_queued_reqs max_num_queued_tokens max_logprobs logprobs_mode
    use_fp64_gumbel enable_trace_replay disable_log_stats aggregate_engine_logging revision
    code_revision hf_token hf_overrides model_class_overrides tokenizer_revision
    quantization quantization_config allow_deprecated_quantization enforce_eager
    disable_custom_all_reduce enable_shm_tensor_arena language_model_only
    limit_mm_per_prompt enable_mm_embeds interleave_mm_strings media_io_kwargs
    mm_processor_kwargs mm_processor_cache_gb mm_processor_cache_type mm_hasher_algorithm
    mm_shm_cache_max_object_size_mb mm_encoder_only mm_encoder_tp_mode
    mm_encoder_attn_backend mm_encoder_attn_dtype mm_encoder_fp8_scale_path
    mm_encoder_fp8_scale_save_path mm_encoder_fp8_scale_save_margin io_processor_plugin
    renderer_num_workers skip_mm_profiling video_pruning_rate video_pruning_method
    mm_tensor_ipc mm_processor_device mm_ipc_gpu_memory_gb mm_device_do_normalize
    enable_lora max_loras max_lora_rank default_mm_loras fully_sharded_loras max_cpu_loras
    lora_dtype lora_target_modules enable_tower_connector_lora specialize_active_lora
    enable_mixed_moe_lora_format enable_moe_shared_loras max_lora_cls_labels
    ray_workers_use_nsight num_gpu_blocks_override model_loader_extra_config ignore_patterns
    enable_chunked_prefill disable_chunked_mm_input scheduler_reserve_full_isl
    prefill_schedule_interval watermark disable_hybrid_kv_cache_manager
    structured_outputs_config aux_output_config reasoning_parser reasoning_parser_plugin
    speculative_config spec_method spec_model spec_tokens watermark_config diffusion_config
    show_hidden_metrics_for_version otlp_traces_endpoint collect_detailed_traces
    per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample
    custom_histogram_buckets cudagraph_metrics enable_layerwise_nvtx_tracing
    enable_mfu_metrics enable_logging_iteration_details jit_monitor_mode jit_monitor_verbose
    enable_mm_processor_stats scheduling_policy scheduler_cls pooler_config
    compilation_config attention_config engram_config mamba_config kernel_config
    enable_flashinfer_autotune monokernel worker_cls worker_extension_cls profiler_config
    logging_config log_level log_config_file kv_transfer_config kv_events_config
    ec_transfer_config ec_manager_config reasoning_config generation_config
    enable_sleep_mode sleep_mode_backend sleep_mode_offload_cudagraph
    sleep_preserve_parameter_names enable_cumem_allocator enable_nccl_comm_suspend
    override_generation_config model_impl attention_backend kv_cache_dtype_skip_layers
    mamba_cache_dtype mamba_ssm_cache_dtype mamba_block_size prefix_match_unit
    mamba_cache_mode enable_mamba_shared_prefix_checkpoint replayssm_buffer_len
    use_replayssm mamba_backend mamba_ssu_algorithm enable_mamba_cache_stochastic_rounding
    mamba_cache_philox_rounds additional_config use_tqdm_on_load pt_load_map_location
    logits_processors async_scheduling stream_interval kv_sharing_fast_prefill
    swa_bounded_replay optimization_level performance_mode fault_tolerance_config
    enable_fault_tolerance kv_offloading_size kv_offloading_backend tokens_only
    shutdown_timeout watchdog_config weight_transfer_config fail_on_environ_validation
    gdn_prefill_backend kda_prefill_backend kda_decode_backend enable_log_requests
    """.split()
)
#: The public fields of `SamplingParams` in vLLM 0.33.0 (`vllm/sampling_params.py`).
SAMPLING_PARAMS_FIELDS = frozenset(
    """
    n presence_penalty frequency_penalty repetition_penalty temperature watermarking top_p
    top_k min_p seed stop stop_token_ids ignore_eos max_tokens min_tokens logprobs
    prompt_logprobs prompt_logprob_token_ids prompt_logprob_start logprob_token_ids
    flat_logprobs detokenize skip_special_tokens spaces_between_special_tokens
    include_stop_str_in_output output_kind stream_interval skip_clone
    output_text_buffer_length structured_outputs logit_bias allowed_token_ids extra_args
    bad_words skip_reading_prefix_cache thinking_token_budget repetition_detection
    routed_experts_prompt_start trace_decode_token_ids
    """.split()
)


def spec(**fields: Any) -> DifyModelSpec:
    return DifyModelSpec.model_validate({"modelId": "org/chat", "device": "cuda", **fields})


# ---- engine arguments ---------------------------------------------------------------------
def test_every_engine_argument_is_a_field_of_the_pinned_vllm() -> None:
    cases = [
        spec(),
        spec(device="cuda:1", precision="bf16", revision="v2"),
        spec(resources={"gpus": 4}, generation={"maxContextTokens": 4096}),
    ]
    for case in cases:
        unknown = set(engine_args(case, "/models/chat", model_positions=2048)) - (
            ENGINE_ARGS_FIELDS
        )
        assert not unknown, f"not fields of AsyncEngineArgs in vLLM 0.33: {unknown}"


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")]
)
def test_precision_becomes_vllms_dtype(precision: str, dtype: str) -> None:
    assert engine_args(spec(precision=precision), "/m")["dtype"] == dtype


def test_the_model_revision_and_safety_settings() -> None:
    args = engine_args(spec(revision="abc123"), "/models/chat")
    assert (args["model"], args["tokenizer"]) == ("/models/chat", "/models/chat")
    assert (args["revision"], args["tokenizer_revision"]) == ("abc123", "abc123")
    assert args["trust_remote_code"] is False
    assert (args["disable_log_stats"], args["enable_log_requests"]) == (True, False)
    assert args["seed"] == 0
    assert engine_args(spec(), "/m")["revision"] is None


def test_context_is_the_spec_capped_at_the_models_positions() -> None:
    assert "max_model_len" not in engine_args(spec(), "/m", model_positions=2048)
    short = spec(generation={"maxContextTokens": 1024})
    assert engine_args(short, "/m", model_positions=2048)["max_model_len"] == 1024
    long = spec(generation={"maxContextTokens": 8192})
    assert engine_args(long, "/m", model_positions=2048)["max_model_len"] == 2048
    assert engine_args(long, "/m")["max_model_len"] == 8192  # vLLM checks it against the model


def test_concurrency_is_vllms_sequence_limit() -> None:
    args = engine_args(spec(batching={"maxConcurrentRequests": 24}), "/m")
    assert args["max_num_seqs"] == 24


def test_gpus_shard_the_model_over_the_replicas_own_processes() -> None:
    one = engine_args(spec(resources={"gpus": 1}), "/m")
    assert one["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in one
    four = engine_args(spec(resources={"gpus": 4}), "/m")
    assert (four["tensor_parallel_size"], four["distributed_executor_backend"]) == (4, "mp")


def test_a_fraction_of_a_gpu_takes_that_fraction_of_its_memory() -> None:
    assert engine_args(spec(), "/m")["gpu_memory_utilization"] == 0.9
    assert engine_args(spec(resources={"gpus": 2}), "/m")["gpu_memory_utilization"] == 0.9
    half = engine_args(spec(resources={"gpus": 0.5}), "/m")
    assert half["gpu_memory_utilization"] == pytest.approx(0.45)


def test_cuda_n_picks_the_visible_gpus_from_n() -> None:
    """`device_ids` are indices into CUDA_VISIBLE_DEVICES for vLLM, as cuda:N is for torch."""
    assert "device_ids" not in engine_args(spec(device="cuda"), "/m")
    assert engine_args(spec(device="cuda:0"), "/m")["device_ids"] == [0]
    assert engine_args(spec(device="cuda:1"), "/m")["device_ids"] == [1]
    sharded = engine_args(spec(device="cuda:2", resources={"gpus": 2}), "/m")
    assert sharded["device_ids"] == [2, 3]


def test_device_cpu_is_refused() -> None:
    with pytest.raises(EngineError) as refused:
        engine_args(spec(device="cpu"), "/m")
    assert (refused.value.status, refused.value.code) == (422, "unsupported_device")
    assert "cuda" in refused.value.message and "cpu" in refused.value.message


# ---- sampling -----------------------------------------------------------------------------
def test_every_sampling_argument_is_a_field_of_the_pinned_vllm() -> None:
    requests = [
        GenerationRequest(prompt="x"),
        GenerationRequest(prompt="x", temperature=0.7, top_p=0.9, seed=5),
    ]
    for request in requests:
        keys = {*sampling_kwargs(request, 16), "output_kind"}  # output_kind: the engine's
        assert keys <= SAMPLING_PARAMS_FIELDS, keys - SAMPLING_PARAMS_FIELDS


def test_no_temperature_or_zero_is_greedy() -> None:
    expected = {"max_tokens": 16, "temperature": 0.0}
    assert sampling_kwargs(GenerationRequest(prompt="x"), 16) == expected
    greedy = GenerationRequest(prompt="x", temperature=0.0, top_p=0.5, seed=3)
    assert sampling_kwargs(greedy, 16) == expected


def test_sampling_carries_temperature_top_p_and_seed() -> None:
    request = GenerationRequest(prompt="x", temperature=0.7, top_p=0.9, seed=5)
    assert sampling_kwargs(request, 32) == {
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 5,
    }
    unseeded = sampling_kwargs(GenerationRequest(prompt="x", temperature=1.0), 8)
    assert unseeded == {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0}


def test_finish_reasons() -> None:
    assert [finish_reason(r) for r in (None, "stop", "length", "repetition")] == [
        None,
        "stop",
        "length",
        "stop",
    ]


def test_the_field_lists_match_the_installed_vllm() -> None:
    """Only where vLLM is installed: the checked-in names are its fields."""
    vllm = pytest.importorskip("vllm")
    from vllm.sampling_params import SamplingParams

    engine = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
    assert {n for n in engine if not n.startswith("_")} == ENGINE_ARGS_FIELDS
    sampling = set(SamplingParams.__struct_fields__)
    assert {n for n in sampling if not n.startswith("_")} == SAMPLING_PARAMS_FIELDS


# ---- the engine on a stand-in vLLM --------------------------------------------------------
class OutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_PARAMS_FIELDS
        assert not unknown, f"not fields of SamplingParams: {unknown}"
        self.kwargs = kwargs


class FakeEngineArgs:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - ENGINE_ARGS_FIELDS
        assert not unknown, f"not fields of AsyncEngineArgs: {unknown}"
        self.kwargs = kwargs


class FakeLLM:
    """AsyncLLM's surface: one word per step; "stop" after `words` words, else "length"."""

    last: FakeLLM | None = None

    def __init__(self, args: FakeEngineArgs) -> None:
        self.args = args.kwargs
        self.model_config = types.SimpleNamespace(max_model_len=self.args.get("max_model_len", 64))
        self.words = 3
        self.fail: Exception | None = None
        self.calls: list[tuple[dict[str, Any], FakeSamplingParams, str]] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.shut_down = False
        FakeLLM.last = self

    @classmethod
    def from_engine_args(cls, args: FakeEngineArgs) -> FakeLLM:
        return cls(args)

    async def generate(
        self, prompt: dict[str, Any], params: FakeSamplingParams, request_id: str
    ) -> AsyncIterator[Any]:
        self.calls.append((prompt, params, request_id))
        kind, limit = params.kwargs["output_kind"], params.kwargs["max_tokens"]
        text, ids = "", list[int]()
        try:
            for step in range(limit):
                await asyncio.sleep(0)
                if self.fail is not None:
                    raise self.fail
                if request_id in self.aborted:
                    yield self._output(text, ids, "abort")
                    return
                word, finish = f"w{step} ", None
                if step + 1 == min(self.words, limit):
                    finish = "stop" if self.words <= limit else "length"
                if kind == OutputKind.DELTA:
                    yield self._output(word, [100 + step], finish)
                else:
                    text, ids = text + word, [*ids, 100 + step]
                    if finish:
                        yield self._output(text, ids, finish)
                if finish:
                    return
        except GeneratorExit:
            self.closed.append(request_id)
            raise

    @staticmethod
    def _output(text: str, ids: list[int], finish: str | None) -> Any:
        done = finish is not None
        completion = types.SimpleNamespace(text=text, token_ids=ids, finish_reason=finish)
        return types.SimpleNamespace(outputs=[completion], finished=done)

    async def abort(self, request_id: str | list[str]) -> None:
        self.aborted.extend([request_id] if isinstance(request_id, str) else request_id)

    def shutdown(self) -> None:
        self.shut_down = True


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A stand-in `vllm` with the names the engine imports, and no CUDA check."""
    modules = {
        "vllm": _module("vllm", AsyncEngineArgs=FakeEngineArgs, __version__="0.33.0"),
        "vllm.v1": _module("vllm.v1"),
        "vllm.v1.engine": _module("vllm.v1.engine"),
        "vllm.v1.engine.async_llm": _module("vllm.v1.engine.async_llm", AsyncLLM=FakeLLM),
        "vllm.inputs": _module(
            "vllm.inputs", tokens_input=lambda ids: {"type": "token", "prompt_token_ids": ids}
        ),
        "vllm.sampling_params": _module(
            "vllm.sampling_params", RequestOutputKind=OutputKind, SamplingParams=FakeSamplingParams
        ),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(base, "_torch_setup", lambda s: (s.device, None))
    yield


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer with a chat template and a config.json: all the engine reads itself."""
    from tiny_models import minilm_path
    from transformers import AutoTokenizer

    from dify_serving.engines.weights import DEMO_CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("chat")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    return folder


def load(chat_model: Path, **fields: Any) -> tuple[VllmGenerationEngine, FakeLLM]:
    engine = VllmGenerationEngine("chat", spec(**fields), str(chat_model))
    assert FakeLLM.last is not None
    return engine, FakeLLM.last


def test_the_engine_builds_vllm_from_the_spec(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(
        chat_model, precision="bf16", resources={"gpus": 2}, generation={"maxContextTokens": 512}
    )
    assert llm.args["dtype"] == "bfloat16"
    assert llm.args["max_model_len"] == 64  # the model's positions cap the spec's 512
    assert engine.max_context == 64
    info = engine.info()
    assert (info["engine"], info["engine_version"], info["precision"]) == ("vllm", "0.33.0", "bf16")
    assert (info["tensor_parallel_size"], info["max_context_tokens"]) == (2, 64)


def test_cpu_is_refused_before_anything_loads(fake_vllm: None, chat_model: Path) -> None:
    FakeLLM.last = None
    with pytest.raises(EngineError) as refused:
        VllmGenerationEngine("chat", spec(device="cpu"), str(chat_model))
    assert refused.value.code == "unsupported_device"
    assert FakeLLM.last is None


def test_generate_returns_the_final_output(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    result = asyncio.run(engine.generate(GenerationRequest(prompt="hello there", max_tokens=8)))
    prompt, params, _ = llm.calls[0]
    assert prompt == {
        "type": "token",
        "prompt_token_ids": engine.tokenizer("hello there")["input_ids"],
    }
    assert params.kwargs == {
        "max_tokens": 8,
        "temperature": 0.0,
        "output_kind": OutputKind.FINAL_ONLY,
    }
    assert (result.text, result.finish_reason) == ("w0 w1 w2 ", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (len(prompt["prompt_token_ids"]), 3)
    short = asyncio.run(engine.generate(GenerationRequest(prompt="hello", max_tokens=2)))
    assert (short.text, short.finish_reason, short.completion_tokens) == ("w0 w1 ", "length", 2)
    assert llm.aborted == [] and engine.info()["active_requests"] == 0


def test_stream_yields_deltas_then_the_counts(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    request = GenerationRequest(
        messages=[{"role": "user", "content": "hi"}], temperature=0.5, top_p=0.8, seed=7
    )

    async def collect() -> list[Any]:
        return [d async for d in engine.generate_stream(request)]

    deltas = asyncio.run(collect())
    prompt, params, _ = llm.calls[0]
    expected_ids = engine.tokenizer.apply_chat_template(
        request.messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt["prompt_token_ids"] == list(expected_ids)
    assert params.kwargs["output_kind"] == OutputKind.DELTA
    assert (params.kwargs["temperature"], params.kwargs["top_p"], params.kwargs["seed"]) == (
        0.5,
        0.8,
        7,
    )
    assert [d.delta for d in deltas] == ["w0 ", "w1 ", "w2 "]
    assert [d.finish_reason for d in deltas] == [None, None, "stop"]
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (len(expected_ids), 3)


def test_a_consumer_that_leaves_aborts_the_request(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    llm.words = 50

    async def first_then_leave() -> str:
        stream = engine.generate_stream(GenerationRequest(prompt="hello", max_tokens=40))
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        return first.delta

    assert asyncio.run(first_then_leave()) == "w0 "
    request_id = llm.calls[0][2]
    assert llm.aborted == [request_id]
    assert llm.closed == [request_id]  # vLLM's own generator was closed too
    assert engine.info()["active_requests"] == 0


def test_a_cancelled_call_aborts_the_request(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    llm.words = 10_000

    async def cancel() -> None:
        request = GenerationRequest(prompt="hello", max_tokens=10_000)
        task = asyncio.create_task(engine.generate(request))
        while not llm.calls:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    assert llm.aborted == [llm.calls[0][2]]


def test_a_prompt_past_the_context_is_refused(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model, generation={"maxContextTokens": 8})
    with pytest.raises(InputTooLong):
        asyncio.run(engine.generate(GenerationRequest(prompt="one two three four five six seven")))
    assert llm.calls == []
    request = GenerationRequest(prompt="hi", max_tokens=100)  # the budget is what is left
    asyncio.run(engine.generate(request))
    room = 8 - len(engine.tokenizer("hi")["input_ids"])
    assert llm.calls[0][1].kwargs["max_tokens"] == room


def test_stop_ends_what_is_in_flight_with_the_reason(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    llm.words = 10_000

    async def unload() -> EngineError:
        stream = engine.generate_stream(GenerationRequest(prompt="hello", max_tokens=10_000))
        await anext(stream)
        await engine.stop("model unloaded")
        with pytest.raises(EngineError) as ended:
            async for _ in stream:
                pass
        return ended.value

    error = asyncio.run(unload())
    assert (error.status, error.code) == (503, "generation_failed")
    assert "model unloaded" in error.message
    assert llm.shut_down


def test_an_engine_failure_is_a_503(fake_vllm: None, chat_model: Path) -> None:
    engine, llm = load(chat_model)
    llm.fail = RuntimeError("engine core died")
    with pytest.raises(EngineError) as failed:
        asyncio.run(engine.generate(GenerationRequest(prompt="hello")))
    assert (failed.value.status, failed.value.code) == (503, "generation_failed")
    assert "engine core died" in failed.value.message
