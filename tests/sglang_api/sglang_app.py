"""SGLang 0.5.23's own HTTP server, run in-process on a CPU, for checking our client against it.

`SGLangApp` serves `sglang.srt.entrypoints.http_server.app` (the real FastAPI app, its real
lifespan, routes, contract gate and body parsing) through starlette's TestClient, backed by SGLang's
real serving processes wherever they run without a GPU -- here as threads of this process that talk
over SGLang's own zmq IPC (pickle frames, `sock_send`/`sock_recv`), as in a launched server:

  HTTP route -> TokenizerManager (REAL, its own __init__; only recording wrappers added)
             -> [zmq] stand-in Scheduler thread (OURS: the real Scheduler needs a GPU model runner,
                KV pools and CUDA) -> [zmq] DetokenizerManager thread (REAL) -> [zmq] TokenizerManager

Real SGLang code behind the routes: `TokenizerManager` (normalize_batch_and_arguments, n>1 / batch
fan-out, `SamplingParams(**sp).normalize/.verify`, multimodal processors -- `QwenVLImageProcessor`
and `InternVLProcessor.process_mm_data_async`, which call SGLang's `load_image` -- pause/continue
with `is_pause_cond`, `model_update_lock`, the FanOut communicators, `_handle_batch_output` building
meta_info, `convert_logprob_style`/`detokenize_logprob_tokens`, abort handling, weight-version
bookkeeping, `normalize_serialized_named_tensor_payloads`), `DetokenizerManager` (incremental
detokenization, stop trimming), `TemplateManager`, a real `ServerArgs` published with SGLang's
`publish` (so `get_serving()`, `get_model()`, `get_parallel()` ... are SGLang's own, unpatched).
Inside the stand-in scheduler, real: `Req` (finish checks: EOS / stop ids / stop strings / length,
`FINISH_*.to_json()`), `_GenerationStreamAccumulator` (the scheduler's BatchTokenIDOutput builder),
`SchedulerWeightUpdaterManager` (sessions, versions, flush-after-update, release/resume tags) over
real `TpModelWorker` methods (`deserialize_own_rank` -> `MultiprocessingSerializer`/`SafeUnpickler`,
`init_weights_update_group`, `weight_update_runners`) and the real model-runner `WeightUpdater`
(`update_weights_from_tensor` incl. `_update_weights_from_flattened_bucket`,
`init_weights_update_group` -> `init_custom_process_group` (PrefixStore(group_name)),
`receive_weights_from_distributed` incl. flattened_bucket, `load_weights_from_distributed`,
`destroy_weights_update_group`), `SchedulerFlushWrapper`, `default_weight_loader`, the noop
`TorchMemorySaverAdapter`, `is_health_check_generate_req`.
Ours (stand-ins, each because SGLang's code needs a GPU or a launched multi-process server):
the scheduler loop itself (one-token-per-step continuous batching, waiting/running queues, pause
modes in_place/retract, abort, is_fully_idle, flush, a weight version kept per scheduler), the model (`StandInModel`, a tiny torch LM
whose greedy output depends on every parameter), its logits/sampling glue (top-k/top-p/min-p
filtering, log_softmax(logits / T) logprobs; no input-token logprobs: `input_token_logprobs` come
back empty; seeded draws), the tp_worker / model_runner holders, a 1-rank gloo WORLD group for the scheduler's
barriers, and `/server_info`'s per-scheduler internal state (SGLang's resolved server-args dict plus
a few fields).

Patches (all undone on exit except the transformers one, which only affects a missing torchvision):
- transformers `processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING` / `ProcessorMixin.
  check_argument_for_proper_class`: without torchvision, Qwen2.5-VL's HF processor gets
  `video_processor=None` (its video processor class needs torchvision); images work unchanged.
  (Same trick as tests/e2e/test_demo.py.)
- `http_server.HEALTH_CHECK_TIMEOUT` (default 20 s) -> `health_check_timeout` (default 2 s), so the
  real /health_generate answers 503 quickly while generation is paused.
- `tokenizer_manager.kill_process_tree`: SGLang kills its whole process tree when the
  TokenizerManager's loop dies; here that would kill pytest, so it marks the server dead instead.
- `http_server._freeze_gc_after_server_warmup`: after warmup a launched server POSTs /freeze_gc to
  its own `server_args.url()` (127.0.0.1:30000) with `requests`; nothing listens there -> no-op.
- `multimodal.processors.internvl.get_device`: SGLang's `get_device()` raises without an
  accelerator (its CPU mode, SGLANG_USE_CPU_ENGINE=1, needs sgl_kernel); the InternVL processor
  only uses it to place its tile tensors -> "cpu".
Nothing else is patched: `get_serving`, `get_disagg`, `get_model`, `get_parallel`,
`describe_kv_events_publisher` all run for real against the published ServerArgs.

A crash of the stand-in scheduler (an exception in SGLang's handler code, e.g. resume without tags
after a partial release -> KeyError) takes the server down like SGLang's SIGQUIT: requests in flight
fail with ConnectionResetError, later ones with ConnectionRefusedError; `server_error` keeps the
exception.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.sglang_api.conftest import SGLANG_AVAILABLE, SKIP_REASON, install_gpu_import_stubs

if not SGLANG_AVAILABLE:
    pytest.skip(SKIP_REASON, allow_module_level=True)
install_gpu_import_stubs()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import zmq  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from transformers import processing_utils  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

import sglang.srt.entrypoints.http_server as http_server  # noqa: E402
import sglang.srt.managers.tokenizer_manager as tokenizer_manager_module  # noqa: E402
import sglang.srt.multimodal.processors.internvl as internvl_processor_module  # noqa: E402
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX  # noqa: E402
from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: E402
from sglang.srt.managers.detokenizer_manager import DetokenizerManager  # noqa: E402
from sglang.srt.managers.io_struct import (  # noqa: E402
    AbortReq, BatchTokenizedGenerateReqInput, BeginWeightUpdateReqInput, CheckWeightsReqInput,
    ContinueGenerationReqInput, DestroyWeightsUpdateGroupReqInput, EndWeightUpdateReqInput,
    FlushCacheReqInput, FreezeGCReq, GetInternalStateReq, GetInternalStateReqOutput,
    GetWeightsByNameReqInput, HealthCheckOutput, InitWeightsUpdateGroupReqInput,
    PauseGenerationReqInput, ReleaseMemoryOccupationReqInput, ResumeMemoryOccupationReqInput,
    TokenizedGenerateReqInput, UpdateWeightFromDiskReqInput, UpdateWeightsFromDistributedReqInput,
    UpdateWeightsFromTensorReqInput, UpdateWeightVersionReqInput, UpdateWeightVersionReqOutput,
    sock_recv, sock_send)
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req  # noqa: E402
from sglang.srt.managers.scheduler_components.flush_wrapper import (  # noqa: E402
    SchedulerFlushWrapper)
from sglang.srt.managers.scheduler_components.output_streamer import (  # noqa: E402
    DEFAULT_FORCE_STREAM_INTERVAL, _GenerationStreamAccumulator)
from sglang.srt.managers.scheduler_components.weight_updater import (  # noqa: E402
    SchedulerWeightUpdaterManager)
from sglang.srt.managers.tokenizer_manager import ServerStatus, TokenizerManager  # noqa: E402
from sglang.srt.managers.tp_worker import TpModelWorker  # noqa: E402
from sglang.srt.managers.utils import is_health_check_generate_req  # noqa: E402
from sglang.srt.model_executor.model_runner_components.weight_updater import (  # noqa: E402
    WeightUpdater)
from sglang.srt.model_loader.weight_utils import default_weight_loader  # noqa: E402
from sglang.srt.parser.template_manager import TemplateManager  # noqa: E402
from sglang.srt.runtime_context import (  # noqa: E402
    SpawnRanks, get_context, get_parallel, get_serving, publish)
from sglang.srt.server_args import PortArgs, ServerArgs  # noqa: E402
from sglang.srt.utils.network import get_zmq_socket  # noqa: E402
from sglang.srt.utils.msgspec_utils import msgspec_to_builtins  # noqa: E402
from sglang.srt.utils.torch_memory_saver_adapter import TorchMemorySaverAdapter  # noqa: E402
from sglang.utils import TypeBasedDispatcher  # noqa: E402

logger = logging.getLogger(__name__)

FAMILIES = ("text", "qwen2_5_vl", "internvl")
# The stand-in model's shapes, the same for every family (each tokenizer used here is smaller).
VOCAB, HIDDEN = 128, 16
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


# --- transformers without torchvision: Qwen2.5-VL's processor without its video processor -------
class _NoVideoProcessor:
    """What AutoProcessor loads for a `video_processor` sub-processor when torchvision is absent."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return None


class _AutoProcessorMapping(type(processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING)):
    def __getitem__(self, key):
        if key == "video_processor" and importlib.util.find_spec("torchvision") is None:
            return _NoVideoProcessor
        return super().__getitem__(key)


_check_processor_argument = ProcessorMixin.check_argument_for_proper_class


def _check_processor_argument_allowing_no_video(self, argument_name, argument):
    if argument_name == "video_processor" and argument is None:
        return None
    return _check_processor_argument(self, argument_name, argument)


processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING = _AutoProcessorMapping()
ProcessorMixin.check_argument_for_proper_class = _check_processor_argument_allowing_no_video


# --- tiny checkpoints -----------------------------------------------------------------------------
def _tiny_tokenizer(extra_special: list[str] = ()):
    from eureka_megatron.data.chat import jinja_chat_template
    from eureka_megatron.models.qwen2_5_vl import QWEN_CHAT
    from eureka_megatron.data.tiny_tokenizer import SPECIAL, tiny_tokenizer

    tok = tiny_tokenizer()
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:6] + ["<|video_pad|>"]
                                + list(extra_special)})
    tok.chat_template = jinja_chat_template(QWEN_CHAT)
    return tok


def _qwen2_text_config(vocab_size: int, eos: int, pad: int) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "eos_token_id": eos, "bos_token_id": None,
            "pad_token_id": pad, "torch_dtype": "bfloat16"}


def write_text_checkpoint(out_dir: str | Path) -> Path:
    """The default "text" checkpoint: the in-repo tiny tokenizer and a decoder-only LM config (no
    weights: the stand-in model serves; SGLang's tokenizer side reads only config and tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    tok.save_pretrained(out)
    # A model type whose AutoTokenizer mapping is the generic TokenizersBackend: for "qwen2",
    # transformers 5 forces Qwen2Tokenizer, which rebuilds a BPE and garbles the word-level vocab.
    config = {**_qwen2_text_config(VOCAB, tok.eos_token_id, tok.pad_token_id),
              "architectures": ["GraniteForCausalLM"], "model_type": "granite"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_internvl_checkpoint(out_dir: str | Path) -> Path:
    """A tiny InternVL in the original layout SGLang's InternVLProcessor reads: config.json with
    model_type "internvl_chat" / InternVLChatModel, llm_config (Qwen2ForCausalLM -> the processor's
    OpenAI-style `<image>` placeholder branch), vision_config.image_size / patch_size and
    downsample_ratio (-> (56 // 14)**2 * 0.5**2 = 4 <IMG_CONTEXT> per 448-px tile), and a tokenizer
    that knows <img>, </img>, <IMG_CONTEXT> (SGLang looks their ids up). No weights."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer(INTERNVL_TOKENS)
    tok.save_pretrained(out)
    llm = _qwen2_text_config(VOCAB, tok.eos_token_id, tok.pad_token_id)
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
              "image_size": 56, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_channels": 3,
              "qkv_bias": True, "norm_type": "layer_norm", "torch_dtype": "bfloat16"}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
              "llm_config": llm, "vision_config": vision, "downsample_ratio": 0.5,
              "force_image_size": 56, "template": "internvl2_5", "dynamic_image_size": True,
              "use_thumbnail": True, "ps_version": "v2", "min_dynamic_patch": 1,
              "max_dynamic_patch": 12, "select_layer": -1, "torch_dtype": "bfloat16",
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# --- the stand-in model -----------------------------------------------------------------------------
class StandInModel(torch.nn.Module):
    """A tiny LM standing in for SGLang's GPU model classes. Parameters in two dtypes; the logits of
    the next token depend on every parameter, so a test can tell which weights are served. Loads
    weights through SGLang's model API (`load_weights`) with SGLang's `default_weight_loader`,
    skipping unknown names with a warning as sglang/srt/models/qwen2.py does."""

    SPECS = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), torch.float32),
             "model.norm.weight": ((HIDDEN,), torch.bfloat16),
             "lm_head.weight": ((VOCAB, HIDDEN), torch.bfloat16)}

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.empty(HIDDEN, dtype=torch.bfloat16))
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype)
                            + (1.0 if name == "model.norm.weight" else 0.0))
        self.requires_grad_(False)
        self.skipped_weight_names: list[str] = []

    @torch.no_grad()
    def next_token_logits(self, token_ids: list[int]) -> torch.Tensor:
        emb = self.model.embed_tokens.weight[torch.tensor(token_ids, dtype=torch.long) % VOCAB]
        h = emb[-1] + emb.mean(0)
        h = h * torch.rsqrt(h.pow(2).mean() + 1e-6) * self.model.norm.weight.float()
        return self.lm_head.weight.float() @ h

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if name in params:
                default_weight_loader(params[name], loaded_weight)
            else:
                self.skipped_weight_names.append(name)
                logger.warning(f"Parameter {name} not found in params_dict")


# --- stand-ins for the GPU side the weight updater talks to ---------------------------------------
class _CpuGroup:
    """What `get_parallel().tp_group` is in a launched server, reduced to the gloo group SGLang's
    weight-update manager barriers on."""

    def __init__(self, cpu_group):
        self.cpu_group = cpu_group


class _StandInModelRunner:
    """Holds the stand-in model and SGLang's real model-runner WeightUpdater for it."""

    def __init__(self, model: StandInModel, model_config):
        self.model = model
        self.weight_updater = WeightUpdater(
            tp_rank=get_parallel().tp_rank, device="cpu", gpu_id=0, model_config=model_config,
            custom_weight_loaders={}, get_model=lambda: self.model,
            update_model_fields=lambda *a, **k: None, recapture_cuda_graph=lambda: None,
            get_model_runner=lambda: self)


class _StandInTpWorker(TpModelWorker):
    """SGLang's TpModelWorker methods (deserialize_own_rank, init/destroy_weights_update_group,
    weight_update_runners) over the stand-in runner; its __init__ would build a GPU ModelRunner."""

    def __init__(self, model_runner: _StandInModelRunner):  # not super().__init__: needs a GPU
        self._model_runner = model_runner
        self.model_runner_list = None


class _Stop:
    """Sent to the DetokenizerManager's loop to end it (its dispatcher rejects unknown types)."""


# --- the stand-in scheduler ---------------------------------------------------------------------------
class _StandInScheduler:
    """Stand-in for sglang.srt.managers.scheduler.Scheduler, which needs a GPU model runner, KV
    pools and CUDA. Speaks SGLang's IPC (zmq + pickle), keeps SGLang's queue semantics (waiting /
    running, `_engine_paused`, retract vs in_place pause, abort via `to_finish`) and hands control
    requests to SGLang's own components."""

    def __init__(self, app: "SGLangApp", server_args: ServerArgs, port_args: PortArgs,
                 model_config, tokenizer, model: StandInModel):
        self.app = app
        self.server_args = server_args
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model = model
        self.vocab_limit = min(VOCAB, len(tokenizer))
        self.context_len = model_config.context_len
        self.max_req_len = self.context_len - 1
        self.max_req_input_len = self.max_req_len - 1
        self.deterministic = bool(server_args.enable_deterministic_inference)
        self._rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.context = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(
            self.context, zmq.PULL, port_args.scheduler_input_ipc_name, False)
        self.send_to_tokenizer = get_zmq_socket(
            self.context, zmq.PUSH, port_args.tokenizer_ipc_name, False)
        self.send_to_detokenizer = get_zmq_socket(
            self.context, zmq.PUSH, port_args.detokenizer_ipc_name, False)
        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self._engine_paused = False
        self.pause_mode: str | None = None
        self.disaggregation_mode = DisaggregationMode.NULL
        self.weight_version = get_serving().weight_version
        self.stop_event = threading.Event()
        self.runner = _StandInModelRunner(model, model_config)
        self.tp_worker = _StandInTpWorker(self.runner)
        self.memory_saver_adapter = TorchMemorySaverAdapter.create(enable=False)
        self.weight_updater = SchedulerWeightUpdaterManager(
            tp_worker=self.tp_worker, draft_worker=None,
            memory_saver_adapter=self.memory_saver_adapter, flush_cache=self.flush_cache,
            is_fully_idle=self.is_fully_idle, scheduler=self)
        self.flush_wrapper = SchedulerFlushWrapper(
            flush_cache=self.flush_cache, is_fully_idle=self.is_fully_idle,
            send_output=lambda output, recv_req: self._send_control(output))
        self.flush_count = 0
        self.dispatcher = TypeBasedDispatcher([
            (TokenizedGenerateReqInput, self.handle_generate_request),
            (BatchTokenizedGenerateReqInput, self.handle_batch_generate_request),
            (FlushCacheReqInput, self.flush_wrapper.handle),
            (AbortReq, self.abort_request),
            (UpdateWeightFromDiskReqInput, self.weight_updater.update_weights_from_disk),
            (InitWeightsUpdateGroupReqInput, self.weight_updater.init_weights_update_group),
            (DestroyWeightsUpdateGroupReqInput, self.weight_updater.destroy_weights_update_group),
            (BeginWeightUpdateReqInput, self.weight_updater.begin_weight_update),
            (EndWeightUpdateReqInput, self.weight_updater.end_weight_update),
            (UpdateWeightsFromDistributedReqInput,
             self.weight_updater.update_weights_from_distributed),
            (UpdateWeightsFromTensorReqInput, self.update_weights_from_tensor),
            (UpdateWeightVersionReqInput, self.handle_update_weight_version),
            (GetWeightsByNameReqInput, self.weight_updater.get_weights_by_name),
            (ReleaseMemoryOccupationReqInput, self.weight_updater.release_memory_occupation),
            (ResumeMemoryOccupationReqInput, self.weight_updater.resume_memory_occupation),
            (CheckWeightsReqInput, self.weight_updater.check_weights),
            (GetInternalStateReq, self.get_internal_state),
            (PauseGenerationReqInput, self.pause_generation),
            (ContinueGenerationReqInput, self.continue_generation),
            (FreezeGCReq, lambda req: None),
        ])

    # -- SGLang Scheduler API used by SchedulerWeightUpdaterManager / flush wrapper -----------------
    def is_fully_idle(self, for_health_check=False, ignore_waiting=False) -> bool:
        """Scheduler.is_fully_idle: running batch empty, and the waiting queue unless ignored."""
        idle = not any(not r.finished() for r in self.running)
        if not ignore_waiting:
            idle &= len(self.waiting_queue) == 0
        return idle

    def flush_cache(self, empty_cache: bool = True) -> bool:
        """Scheduler.flush_cache: succeeds only when fully idle (waiting ignored while paused)."""
        if self.is_fully_idle(ignore_waiting=self._engine_paused):
            self.flush_count += 1
            return True
        logger.warning(f"Cache not flushed because there are pending requests. "
                       f"#queue-req: {len(self.waiting_queue)}, #running-req: {len(self.running)}")
        return False

    def record_weight_version_change(self, new_version):
        """Scheduler.record_weight_version_change's rule (None / unchanged -> no-op). Kept here,
        not in the process-wide config context: in a launched server that context is the
        scheduler process's own, and the tokenizer side records its version separately."""
        if new_version is None or new_version == self.weight_version:
            return
        self.weight_version = new_version

    def handle_update_weight_version(self, recv_req: UpdateWeightVersionReqInput):
        self.record_weight_version_change(new_version=recv_req.new_version)
        return UpdateWeightVersionReqOutput()

    def update_weights_from_tensor(self, recv_req: UpdateWeightsFromTensorReqInput):
        """SGLang's manager; with `fail_next_tensor_update`, the runner's own failure path fires:
        a model that declares `_derived_weight_cache_error` makes SGLang's WeightUpdater refuse."""
        inject = self.app.fail_next_tensor_update
        if inject:
            self.app.fail_next_tensor_update = False
            self.model._derived_weight_cache_error = (
                "injected failure (SGLangApp.fail_next_tensor_update)")
        try:
            return self.weight_updater.update_weights_from_tensor(recv_req)
        finally:
            if inject:
                del self.model._derived_weight_cache_error

    def get_internal_state(self, recv_req: GetInternalStateReq):
        """Scheduler internal state: SGLang's resolved server-args dict plus a few topology
        fields (the memory/graph parts need a GPU)."""
        state = get_context().resolved_server_args_dict()
        state.update(world_size=get_parallel().tp_size, last_gen_throughput=0.0,
                     effective_max_running_requests_per_dp=None)
        state.pop("custom_sigquit_handler", None)
        return GetInternalStateReqOutput(internal_state=msgspec_to_builtins(state))

    def pause_generation(self, recv_req: PauseGenerationReqInput):
        """Scheduler.pause_generation: in_place keeps requests running (so a flush is refused);
        retract moves them back to the waiting queue (a flush then succeeds)."""
        assert recv_req.mode in ("in_place", "retract")
        self._engine_paused = True
        self.pause_mode = recv_req.mode
        if recv_req.mode == "retract":
            for req in self.running:
                if not req.finished():
                    req.retraction_count += 1
                    self.waiting_queue.append(req)
            self.running = []

    def continue_generation(self, recv_req: ContinueGenerationReqInput):
        self._engine_paused = False
        self.pause_mode = None

    def abort_request(self, recv_req: AbortReq):
        """Scheduler.abort_request: queued requests are answered with an AbortReq at once,
        running ones get `to_finish = FINISH_ABORT()` and finish on their next step."""
        for req in list(self.waiting_queue):
            if recv_req.abort_all or req.rid.startswith(recv_req.rid):
                self.waiting_queue.remove(req)
                self._send_control(AbortReq(rid=req.rid, finished_reason=recv_req.finished_reason))
        for req in self.running:
            if not req.finished() and (recv_req.abort_all or req.rid.startswith(recv_req.rid)):
                req.to_finish = FINISH_ABORT()

    # -- generation ---------------------------------------------------------------------------------
    def handle_batch_generate_request(self, recv_req: BatchTokenizedGenerateReqInput):
        for req in recv_req.batch:
            self.handle_generate_request(req)

    def handle_generate_request(self, recv_req: TokenizedGenerateReqInput):
        """Builds SGLang's Req the way Scheduler._handle_generate_request does."""
        if is_health_check_generate_req(recv_req) and not self.is_fully_idle(for_health_check=True):
            self._send_control(HealthCheckOutput())  # busy: the running batch carries health
            return
        req = Req(recv_req.rid, recv_req.input_text, recv_req.input_ids,
                  recv_req.sampling_params, return_logprob=recv_req.return_logprob,
                  top_logprobs_num=recv_req.top_logprobs_num,
                  token_ids_logprob=recv_req.token_ids_logprob, stream=recv_req.stream,
                  eos_token_ids=self.model_config.hf_eos_token_id,
                  vocab_size=self.model_config.vocab_size,
                  http_worker_ipc=recv_req.http_worker_ipc, time_stats=recv_req.time_stats)
        req.tokenizer = self.tokenizer
        if req.return_logprob:
            req.logprob.output_token_logprobs_val, req.logprob.output_token_logprobs_idx = [], []
            req.logprob.output_top_logprobs_val, req.logprob.output_top_logprobs_idx = [], []
            req.logprob.output_token_ids_logprobs_val = []
            req.logprob.output_token_ids_logprobs_idx = []
        max_new = req.sampling_params.max_new_tokens
        max_new = 1 << 30 if max_new is None else max_new
        req.sampling_params.max_new_tokens = max(
            0, min(max_new, self.max_req_len - len(req.origin_input_ids) - 1))
        if len(req.origin_input_ids) >= self.max_req_input_len:
            req.set_finish_with_abort("Input length exceeds the maximum allowed length.")
        self.waiting_queue.append(req)

    def _sample(self, req: Req) -> tuple[int, torch.Tensor]:
        sp = req.sampling_params
        ids = list(req.origin_input_ids) + list(req.output_ids)
        logits = self.model.next_token_logits(ids)
        logits[self.vocab_limit:] = float("-inf")
        logprobs = torch.log_softmax(logits / sp.temperature, dim=-1)
        if sp.top_k == 1:
            return int(torch.argmax(logits)), logprobs
        probs = logprobs.exp()
        if sp.top_k < VOCAB:
            kth = torch.topk(probs, sp.top_k).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)
        if sp.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = (sorted_p.cumsum(0) - sorted_p) > sp.top_p
            probs[order[drop]] = 0.0
        if sp.min_p > 0.0:
            probs = torch.where(probs < sp.min_p * probs.max(), 0.0, probs)
        probs = probs / probs.sum()
        if self.deterministic:
            # sampling/sampling_batch_info.py: only with --enable-deterministic-inference does a
            # request sample with its sampling_seed (42 when unset), mixed with the token's
            # position (layers/sampler.py multinomial_with_seed, whose CPU path needs sgl_kernel's
            # murmur hash -- so the draw itself is ours); otherwise sampling_seed is ignored.
            seed = sp.sampling_seed if sp.sampling_seed is not None else 42
            gen = torch.Generator().manual_seed(hash((seed, len(ids) - 1)) & (2**63 - 1))
            return int(torch.multinomial(probs, 1, generator=gen)), logprobs
        return int(torch.multinomial(probs, 1, generator=self._rng)), logprobs

    def _decode_step(self, req: Req) -> None:
        if not req.finished() and req.to_finish is None and len(req.output_ids) < \
                req.sampling_params.max_new_tokens:
            token, logprobs = self._sample(req)
            req.output_ids.append(token)
            if req.return_logprob:
                lp = req.logprob
                lp.output_token_logprobs_val.append(float(logprobs[token]))
                lp.output_token_logprobs_idx.append(token)
                if lp.top_logprobs_num > 0:
                    top = torch.topk(logprobs, lp.top_logprobs_num)
                    lp.output_top_logprobs_val.append(top.values.tolist())
                    lp.output_top_logprobs_idx.append(top.indices.tolist())
                else:
                    lp.output_top_logprobs_val.append([])
                    lp.output_top_logprobs_idx.append([])
                ids = lp.token_ids_logprob
                lp.output_token_ids_logprobs_val.append(
                    [float(logprobs[i]) for i in ids] if ids else [])
                lp.output_token_ids_logprobs_idx.append(list(ids) if ids else [])
            req.update_finish_state()
        elif not req.finished():
            req.update_finish_state()
            if not req.finished():  # max_new_tokens == 0 (n>1 prefix warm-up) or length cap
                req.finished_reason = FINISH_LENGTH(length=req.sampling_params.max_new_tokens)
                req.finished_len = len(req.output_ids)

    def _stream(self, reqs: list[Req]) -> None:
        """Scheduler output: SGLang's own accumulator builds the BatchTokenIDOutput."""
        if not reqs:
            return
        acc = _GenerationStreamAccumulator(
            return_logprob=any(r.return_logprob for r in reqs), return_hidden_states=False,
            return_routed_experts=False, return_indexer_topk=False, return_sampling_mask=False,
            spec_algorithm=_NoSpec(), disaggregation_mode=DisaggregationMode.NULL,
            default_stream_interval=get_serving().stream_interval,
            default_force_stream_interval=DEFAULT_FORCE_STREAM_INTERVAL,
            get_cached_tokens_details=lambda req: None,
            is_request_level_customized_info_key=lambda key: False,
            current_weight_version=self.weight_version)
        for req in reqs:
            if req.finished() and req.finished_output:
                continue
            acc.accept(req=req)
        payload = acc.to_payload(dp_rank=None, is_idle_batch=False)
        if payload is not None:
            sock_send(self.send_to_detokenizer, payload)

    def step(self) -> None:
        if self._engine_paused:
            return
        if self.waiting_queue:
            self.running += self.waiting_queue
            self.waiting_queue = []
        if not self.running:
            return
        if self.app.decode_step_delay:
            time.sleep(self.app.decode_step_delay)
        for req in self.running:
            self._decode_step(req)
        self._stream(self.running)
        self.running = [r for r in self.running if not r.finished()]

    # -- loop ---------------------------------------------------------------------------------------
    def _send_control(self, output) -> None:
        sock_send(self.send_to_tokenizer, output)

    def _recv_all(self, block: bool) -> list:
        out = []
        if block and not self.recv_from_tokenizer.poll(timeout=20):
            return out
        while True:
            try:
                out.append(sock_recv(self.recv_from_tokenizer, zmq.NOBLOCK))
            except zmq.ZMQError:
                return out

    def _has_work(self) -> bool:
        return not self._engine_paused and bool(self.running or self.waiting_queue)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for recv_req in self._recv_all(block=not self._has_work()):
                    if hasattr(recv_req, "unwrap_pickle_fields"):
                        recv_req.unwrap_pickle_fields()
                    for sub in getattr(recv_req, "batch", [recv_req]):
                        if hasattr(sub, "unwrap_pickle_fields") and sub is not recv_req:
                            sub.unwrap_pickle_fields()
                    self.app._on_scheduler_request(recv_req)
                    output = self.dispatcher(recv_req)
                    if output is not None:
                        self._send_control(output)
                self.flush_wrapper.check_pending()
                self.step()
        except BaseException as e:  # SGLang: the scheduler dies and SIGQUITs the server
            logger.error(f"Stand-in scheduler hit an exception: {e!r}", exc_info=True)
            self.app._server_died(e)
        finally:
            try:
                sock_send(self.send_to_detokenizer, _Stop())
            except Exception:
                pass

    def close(self) -> None:
        for sock in (self.recv_from_tokenizer, self.send_to_tokenizer, self.send_to_detokenizer):
            sock.close(linger=0)
        self.context.term()


class _NoSpec:
    """The scheduler's spec_algorithm when speculative decoding is off."""

    def is_none(self) -> bool:
        return True


# --- the recording TokenizerManager -----------------------------------------------------------------
class _Arrival:
    """The `requests` entry reserved for one HTTP request when it arrives."""

    def __init__(self, path: str, placeholder: tuple):
        self.path, self.placeholder, self.filled = path, placeholder, False


_ARRIVAL = contextvars.ContextVar("sglang_app_arrival", default=None)
# TokenizerManager methods whose first argument is the request body FastAPI built.
_RECORDED_CONTROL = ("pause_generation", "continue_generation", "update_weights_from_tensor",
                     "begin_weight_update", "end_weight_update", "update_weights_from_distributed",
                     "init_weights_update_group", "destroy_weights_update_group",
                     "release_memory_occupation", "resume_memory_occupation",
                     "update_weight_version", "update_weights_from_disk", "get_weights_by_name",
                     "check_weights")


class _RecordingTokenizerManager(TokenizerManager):
    """SGLang's TokenizerManager, unchanged, plus recording of what arrives (for assertions)."""

    def __init__(self, server_args, port_args, app: "SGLangApp"):
        self._app = app
        super().__init__(server_args, port_args)

    def _record(self, obj) -> None:
        """Fill this HTTP request's `requests` entry with the body object FastAPI built."""
        arrival = _ARRIVAL.get()
        entry = (arrival.path if arrival else "", copy.deepcopy(obj))
        requests = self._app.requests
        if arrival is not None and not arrival.filled:
            arrival.filled = True
            for i in range(len(requests) - 1, -1, -1):  # by identity: tests may clear the list
                if requests[i] is arrival.placeholder:
                    requests[i] = entry
                    return
        requests.append(entry)

    async def generate_request(self, obj, request=None):
        health = isinstance(obj.rid, str) and obj.rid.startswith(HEALTH_CHECK_RID_PREFIX)
        if not health:
            self._record(obj)
        async for out in super().generate_request(obj, request):
            if not health:
                for item in out if isinstance(out, list) else [out]:
                    meta = item.get("meta_info", {}) if isinstance(item, dict) else {}
                    if meta.get("finish_reason") is not None and "prompt_tokens" in meta:
                        self._app.prompt_tokens.append(meta["prompt_tokens"])
            yield out

    async def _tokenize_one_request(self, obj):
        tokenized = await super()._tokenize_one_request(obj)
        if not (isinstance(obj.rid, str) and obj.rid.startswith(HEALTH_CHECK_RID_PREFIX)):
            self._app.expanded_input_ids.append(list(tokenized.input_ids))
        return tokenized

    async def flush_cache(self, timeout_s=None):
        self._record(FlushCacheReqInput(timeout_s=timeout_s))
        return await super().flush_cache(timeout_s=timeout_s)


def _recording(name):
    async def method(self, obj, *args, **kwargs):
        self._record(obj)
        return await getattr(TokenizerManager, name)(self, obj, *args, **kwargs)
    method.__name__ = name
    return method


for _name in _RECORDED_CONTROL:
    if hasattr(TokenizerManager, _name):
        setattr(_RecordingTokenizerManager, _name, _recording(_name))


class _RecordingASGI:
    """Wraps SGLang's app: reserves each request's `requests` entry in arrival order (route path,
    None until the TokenizerManager records the body object) and notes its task (so a dead server
    can drop the connections in flight)."""

    def __init__(self, app, owner: "SGLangApp"):
        self.app = app
        self.owner = owner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        placeholder = (scope["path"], None)
        self.owner.requests.append(placeholder)
        _ARRIVAL.set(_Arrival(scope["path"], placeholder))
        task = asyncio.current_task()
        self.owner._tasks.add(task)
        try:
            return await self.app(scope, receive, send)
        except Exception as e:  # uvicorn logs it and answers 500; keep it for assertions too
            logger.exception(f"Exception in ASGI application ({scope['path']})")
            self.owner.route_errors.append((scope["path"], e))
            raise
        finally:
            self.owner._tasks.discard(task)


# --- the harness ---------------------------------------------------------------------------------------
class SGLangApp:
    """SGLang's real http_server FastAPI app, served in-process through starlette's TestClient,
    with SGLang's real TokenizerManager and DetokenizerManager and a stand-in scheduler/model
    (module docstring). One at a time per process (SGLang's config context is process-wide)."""

    url = "http://sglang-app"
    _active_lock = threading.Lock()

    def __init__(self, model_dir: str | None = None, *, family: str = "text",
                 weight_version: str = "0", tp_size: int = 1,
                 enable_deterministic_inference: bool = False,
                 health_check_timeout: float = 2.0, **server_args_overrides):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if model_dir is None and family != "text":
            raise ValueError(f"family {family!r} needs model_dir (the HF checkpoint)")
        self.model_dir = model_dir
        self.family = family
        self.health_check_timeout = health_check_timeout
        self._server_args_kwargs = dict(
            tp_size=tp_size, weight_version=weight_version,
            enable_deterministic_inference=enable_deterministic_inference,
            **server_args_overrides)
        if enable_deterministic_inference:
            # SGLang's resolver refuses deterministic inference with the CPU default attention
            # backend; the stand-in model has no attention, so name one it accepts.
            self._server_args_kwargs.setdefault("attention_backend", "triton")
        # (route path, body object) per HTTP request in arrival order; the object is the io_struct
        # FastAPI built (GenerateReqInput, UpdateWeightsFromTensorReqInput, ...; FlushCacheReqInput
        # for /flush_cache), before SGLang normalizes it; None for body-less routes (/model_info).
        self.requests: list[tuple[str, Any]] = []
        self.prompt_tokens: list[int] = []
        self.expanded_input_ids: list[list[int]] = []
        self.scheduler_requests: list[Any] = []
        self.fail_next_tensor_update = False
        self.decode_step_delay = 0.0
        self.server_error: BaseException | None = None
        self.route_errors: list[tuple[str, BaseException]] = []
        self._tasks: set = set()
        self._dead = threading.Event()
        self._tmp: str | None = None
        self._started = False

    @classmethod
    def param_specs(cls) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stand-in model's parameters: name -> (shape, dtype); the same for every family."""
        return dict(StandInModel.SPECS)

    # -- state for assertions ------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The stand-in model's current parameters (clones)."""
        return {n: p.detach().clone() for n, p in self._model.named_parameters()}

    @property
    def weight_version(self) -> str | None:
        """The weight version SGLang's scheduler (weight-update manager) recorded."""
        return self._scheduler.weight_version

    @property
    def session_open(self) -> bool:
        return self._scheduler.weight_updater._session is not None

    @property
    def paused(self) -> bool:
        """The TokenizerManager's pause flag (what makes a /generate wait)."""
        return bool(self._tm.is_pause)

    @property
    def tokenizer_manager(self) -> TokenizerManager:
        return self._tm

    @property
    def scheduler(self) -> _StandInScheduler:
        return self._scheduler

    # -- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> "SGLangApp":
        if not SGLangApp._active_lock.acquire(blocking=False):
            raise RuntimeError("only one SGLangApp at a time per process")
        try:
            self._start()
        except BaseException:
            self._stop()
            SGLangApp._active_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stop()
        finally:
            SGLangApp._active_lock.release()

    def _start(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="sglang_app_")
        model_dir = self.model_dir or str(write_text_checkpoint(Path(self._tmp) / "text"))
        self.server_args = ServerArgs(model_path=model_dir, device="cpu",
                                      skip_server_warmup=True, **self._server_args_kwargs)
        publish(self.server_args, role="tokenizer", ranks=SpawnRanks(world_rank=0))
        self._own_world = not dist.is_initialized()
        if self._own_world:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        get_parallel().override_permanently(tp_group=_CpuGroup(dist.group.WORLD))
        self._saved_health_timeout = http_server.HEALTH_CHECK_TIMEOUT
        http_server.HEALTH_CHECK_TIMEOUT = self.health_check_timeout
        self._saved_kill = tokenizer_manager_module.kill_process_tree
        tokenizer_manager_module.kill_process_tree = self._kill_process_tree
        self._saved_freeze = http_server._freeze_gc_after_server_warmup
        http_server._freeze_gc_after_server_warmup = lambda server_args: None
        self._saved_get_device = internvl_processor_module.get_device
        internvl_processor_module.get_device = lambda device_id=None: "cpu"
        self.port_args = PortArgs.init_new(self.server_args)

        self._tm = _RecordingTokenizerManager(self.server_args, self.port_args, app=self)
        self._detokenizer = DetokenizerManager(self.server_args, self.port_args)
        self._model = StandInModel()
        self._scheduler = _StandInScheduler(self, self.server_args, self.port_args,
                                            self._tm.model_config, self._detokenizer.tokenizer,
                                            self._model)
        self._threads = [threading.Thread(target=self._run_detokenizer, daemon=True,
                                          name="sglang-app-detokenizer"),
                         threading.Thread(target=self._scheduler.run, daemon=True,
                                          name="sglang-app-scheduler")]
        for thread in self._threads:
            thread.start()

        scheduler_info = {"status": "ready", "max_total_num_tokens": self._scheduler.context_len,
                          "max_req_input_len": self._scheduler.max_req_input_len,
                          "startup_time": {}}
        self._tm.max_req_input_len = scheduler_info["max_req_input_len"]
        self._tm.set_startup_time(scheduler_info["startup_time"])
        template_manager = TemplateManager()
        template_manager.initialize_templates(
            tokenizer_manager=self._tm, model_path=model_dir,
            chat_template=get_serving().chat_template,
            completion_template=get_serving().completion_template)
        http_server.set_global_state(http_server._GlobalState(
            tokenizer_manager=self._tm, template_manager=template_manager,
            scheduler_info=scheduler_info))
        http_server.app.is_single_tokenizer_mode = True
        http_server.app.server_args = self.server_args
        http_server.app.warmup_thread_kwargs = dict(
            server_args=self.server_args, launch_callback=None,
            execute_warmup_func=http_server._execute_server_warmup)

        self._client = TestClient(_RecordingASGI(http_server.app, self), base_url=self.url,
                                  raise_server_exceptions=False)
        self._client.__enter__()  # runs the real lifespan; all requests share its event loop
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="sglang-app")
        self._started = True
        deadline = time.monotonic() + 30
        while self._tm.server_status != ServerStatus.Up:
            if time.monotonic() > deadline:
                raise RuntimeError("SGLang's warmup thread never marked the server Up")
            time.sleep(0.01)

    def _stop(self) -> None:
        stuck = []
        if getattr(self, "_scheduler", None) is not None:
            self._scheduler.stop_event.set()
        if self._started:
            self._drop_connections()
            self._pool.shutdown(wait=False, cancel_futures=True)
            try:
                self._client.__exit__(None, None, None)
            except Exception:
                logger.exception("TestClient shutdown failed")
        threads = getattr(self, "_threads", [])
        for thread in threads:
            thread.join(timeout=10)
        # A thread still blocked (e.g. the scheduler inside a gloo rendezvous that never
        # completed) keeps its sockets: closing a zmq socket under a live recv aborts the process.
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.error(f"SGLangApp threads still running after shutdown: {stuck}")
        if getattr(self, "_scheduler", None) is not None and not stuck:
            for group in list(self._scheduler.runner.weight_updater._model_update_group):
                self._scheduler.runner.weight_updater.destroy_weights_update_group(group)
            self._scheduler.close()
        if getattr(self, "_detokenizer", None) is not None and not stuck:
            self._detokenizer.recv_from_scheduler.close(linger=0)
            self._detokenizer.send_to_tokenizer.close(linger=0)
        if getattr(self, "_tm", None) is not None:
            self._tm.recv_from_detokenizer.close(linger=0)
            self._tm.send_to_scheduler.close(linger=0)
        if getattr(self, "_own_world", False) and dist.is_initialized() and not stuck:
            dist.destroy_process_group()
        if hasattr(self, "_saved_health_timeout"):
            http_server.HEALTH_CHECK_TIMEOUT = self._saved_health_timeout
        if hasattr(self, "_saved_kill"):
            tokenizer_manager_module.kill_process_tree = self._saved_kill
        if hasattr(self, "_saved_freeze"):
            http_server._freeze_gc_after_server_warmup = self._saved_freeze
        if hasattr(self, "_saved_get_device"):
            internvl_processor_module.get_device = self._saved_get_device
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._started = False

    def _run_detokenizer(self) -> None:
        try:
            self._detokenizer.event_loop()
        except ValueError as e:  # _Stop: its dispatcher has no handler for it
            if "_Stop" not in str(e) and "Invalid object" not in str(e):
                logger.exception("DetokenizerManager stopped")
                self._server_died(e)
        except Exception as e:
            logger.exception("DetokenizerManager stopped")
            self._server_died(e)

    # -- a dead server ----------------------------------------------------------------------------------
    def _on_scheduler_request(self, recv_req) -> None:
        self.scheduler_requests.append(recv_req)

    def _server_died(self, error: BaseException) -> None:
        if self.server_error is None:
            self.server_error = error
        self._dead.set()
        if self._started:
            self._drop_connections()

    def _drop_connections(self) -> None:
        """Cancel the requests in flight (on the server's loop), as a killed server would."""
        portal = getattr(self._client, "portal", None)
        if portal is None:
            return

        async def cancel():
            for task in list(self._tasks):
                task.cancel()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another thread: hop onto the server's loop
            try:
                portal.call(cancel)
            except Exception:
                pass
        else:  # already on the server's loop (SGLang's own crash handler ran there)
            for task in list(self._tasks):
                task.cancel()

    def _kill_process_tree(self, *args, **kwargs) -> None:
        """In place of SGLang's kill_process_tree(os.getpid()): mark the server dead."""
        self._server_died(RuntimeError("SGLang asked to kill the server process tree"))

    # -- the transport our client uses --------------------------------------------------------------------
    def transport(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                  timeout: float) -> tuple[int, bytes]:
        """One HTTP exchange: full URL in, (status, raw body) out. Thread-safe; every request runs
        on the app's one event loop. Raises TimeoutError past `timeout` (the request keeps running
        server-side, as with a real server), ConnectionResetError / ConnectionRefusedError once the
        server died."""
        if not self._started:
            raise ConnectionRefusedError("SGLangApp is not running")
        if self._dead.is_set():
            raise ConnectionRefusedError(f"SGLang server died: {self.server_error!r}")
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        future = self._pool.submit(self._client.request, method, target, content=body,
                                   headers=headers)
        try:
            response = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{method} {target} timed out after {timeout} s") from None
        except BaseException as e:
            if self._dead.is_set():
                raise ConnectionResetError(
                    f"SGLang server died: {self.server_error!r}") from e
            raise
        if self._dead.is_set() and response.status_code >= 500:
            raise ConnectionResetError(f"SGLang server died: {self.server_error!r}")
        return int(response.status_code), response.content

    def post(self, path: str, payload: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        """Convenience for self-tests: POST JSON to `path`, answer (status, parsed JSON or text)."""
        body = json.dumps(payload if payload is not None else {}).encode()
        status, raw = self.transport("POST", self.url + path, body,
                                     {"Content-Type": "application/json"}, timeout)
        return status, _parse(raw)

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, Any]:
        status, raw = self.transport("GET", self.url + path, None, {}, timeout)
        return status, _parse(raw)


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
