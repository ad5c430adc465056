"""The CPU compatibility layer: lets megatron-core 0.16 train, checkpoint and reshard without CUDA.

megatron-core assumes a GPU in a few hundred places (the CUDA RNG tracker, `current_device()`,
literal `device="cuda"`, `Tensor.type()` string checks). On a machine without CUDA, `activate()`
patches exactly those assumptions so the real megatron code paths (TP/PP/DP, DDP, the distributed
optimizer, dist_checkpointing) run on CPU tensors over gloo. With CUDA present it does nothing.

Two entry points, both idempotent:
  * `activate()` -- torch-level patches; call before megatron builds anything.
  * `patch_megatron()` -- patches inside megatron modules; called by `activate()` once
    `megatron.core` imports.
Each patch below states the megatron call site that needs it.
"""
from __future__ import annotations

import contextlib
import sys
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode

_state = {"torch": False, "megatron": False, "mode": None}


def is_active() -> bool:
    """True when the layer is (or would be) active: CUDA is unavailable in this process."""
    return not torch.cuda.is_available()


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(new_state, *_args, **_kwargs) -> None:
    torch.default_generator.set_state(new_state)


def _seed_cpu(seed, *_args, **_kwargs) -> None:
    # Must not call torch.manual_seed: that calls torch.cuda.manual_seed_all -> infinite recursion.
    torch.default_generator.manual_seed(int(seed))


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # megatron passes `torch.cuda.current_device()` (an int) as a device in many places.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in factory calls and `Tensor.to(...)`.

    Why: ~80 literal `device="cuda"` / `torch.device("cuda")` sites in megatron-core, e.g.
    `schedules.py` (total_num_tokens), `clip_grads.py`, `optimizer.py`, `utils.py`.

    A mode's handler runs `func` with the mode popped. For a backward pass that is megatron code
    too -- activation recompute re-runs layers inside `torch.autograd.backward`, and under
    sequence parallelism their gathers allocate on `torch.cuda.current_device()` -- so backward
    passes run the autograd engine with the mode pushed again (`_backward_in_mode`).
    """

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return _backward_in_mode(self, *args, **kwargs)
        return func(*args, **kwargs)


def _backward_in_mode(mode, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                      inputs=None, gradient=None):
    """`torch.autograd.backward` past its torch-function dispatch (which would pop `mode`
    again): the engine runs with `mode` pushed. Also `Tensor.backward(self, gradient, ...)`,
    whose arguments line up (`gradient` by keyword)."""
    grad_tensors = grad_tensors if grad_tensors is not None else gradient
    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs or ())
    grads = torch.autograd._make_grads(
        tensors, torch.autograd._tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
        is_grads_batched=False)
    retain_graph = create_graph if retain_graph is None else retain_graph
    with mode:
        torch.autograd.graph._engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                                                  allow_unreachable=True, accumulate_grad=True)


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` without arguments reports the CUDA type name.

    Why: `clip_grads.py` asserts `param.grad.type() == 'torch.cuda.FloatTensor'` and
    `distrib_optimizer.py` / `optimizer.py` accept only `torch.cuda.*Tensor` parameters.
    """
    if dtype is None and not kwargs:
        name = _orig["tensor_type"](self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _orig["tensor_type"](self, dtype, non_blocking, **kwargs)


class _FakeStream:
    """Stands in for `torch.cuda.Stream` / `Event`: megatron records and waits on these around
    communication overlap; on CPU everything is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def record_event(self, *args, **kwargs):
        """An event to wait on later (the MoE all-to-all dispatcher's `d2h_event.synchronize()`)."""
        return _FakeStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_orig: dict = {}


def _patch_torch() -> None:
    cuda = torch.cuda
    _orig["tensor_type"] = torch.Tensor.type
    # RNG tracker (tensor_parallel/random.py): CUDA RNG state -> the CPU generator.
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state
    cuda.get_rng_state_all = lambda: [_cpu_rng_state()]
    cuda.set_rng_state_all = lambda states: _set_cpu_rng_state(states[0])
    cuda.manual_seed = _seed_cpu
    cuda.manual_seed_all = _seed_cpu
    cuda.random.manual_seed = _seed_cpu
    cuda.random.manual_seed_all = _seed_cpu
    # `torch.cuda.current_device()` is used as a device argument (175 call sites, first in
    # GlobalMemoryBuffer.get_tensor); the device mode maps the returned index to CPU.
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    # `.cuda()` calls in model setup and the pipeline schedules; `synchronize` in timers/schedules.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    cuda.synchronize = lambda *a, **k: None
    torch.Tensor.type = _tensor_type
    # Streams, events, memory stats, NVTX: defensive fakes for overlap/timer code paths.
    cuda.Stream = _FakeStream
    cuda.Event = _FakeStream
    cuda.current_stream = lambda *a, **k: _FakeStream()
    cuda.default_stream = lambda *a, **k: _FakeStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    mode = _CudaToCpuMode()
    mode.__enter__()  # process-wide for the main thread; never exited
    _state["mode"] = mode


def _replace_everywhere(original, replacement) -> None:
    """Rebind `original` in every loaded megatron module (covers `from x import f` copies)."""
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("megatron") or not isinstance(mod, types.ModuleType):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)


def patch_megatron() -> None:
    """Patches inside megatron-core; call after `import megatron.core`. CPU-only, idempotent."""
    if _state["megatron"] or not is_active():
        return
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    # `_set_cuda_rng_state` defers through `torch.cuda._lazy_call`, which never runs without
    # CUDA, so the tracker's fork() would silently not switch states.
    _replace_everywhere(mrandom._get_cuda_rng_state, _cpu_rng_state)
    _replace_everywhere(mrandom._set_cuda_rng_state, _set_cpu_rng_state)

    # MoE router (moe_utils.RouterGatingLinearFunction): tests `te_general_gemm is not None`, a
    # name that only the Transformer Engine import defines -> NameError without TE. None selects
    # its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # MoE all-to-all dispatcher: `maybe_move_tensor_to_cpu(splits, as_numpy=True)` converts only
    # CUDA tensors, so on CPU the split sizes stay tensors, which `all_to_all_single` refuses
    # (it takes a sequence of ints: numpy arrays, as on GPU). Convert CPU tensors too.
    _orig["to_host"] = moe_utils.maybe_move_tensor_to_cpu
    _replace_everywhere(moe_utils.maybe_move_tensor_to_cpu, _tensor_to_host)
    # MoE under expert TP > 1 (token_dispatcher.py: the all-gather-v of tokens over the expert TP
    # group and its reduce-scatter-v): `all_gather` of unequal tensors and a list
    # `reduce_scatter`, neither of which gloo has. Equal-size collectives in their place.
    _orig["gather_first"] = mappings._gather_along_first_dim
    _orig["reduce_scatter_first"] = mappings._reduce_scatter_along_first_dim
    mappings._gather_along_first_dim = _gather_along_first_dim_v
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim_v

    dopt = distrib_optimizer.DistributedOptimizer
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        # Bug 1 (torch Adam fallback): loading copies every live state key, including torch
        # Adam's `step`, from the checkpoint, which has no `step` -> KeyError. Skip absent keys.
        def _set_states(self, model_param, tensors, _orig_set=dopt._set_main_param_and_optimizer_states):
            group_index, group_order = self.model_param_group_index_map[model_param]
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return _orig_set(self, model_param, tensors)
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            for key, value in dst.items():
                if key in tensors:
                    value.copy_(tensors[key])

        # Bug 2: load_state_dict gives every parameter the same `step` tensor object; torch
        # Adam's foreach path then increments it once per parameter per step, breaking bias
        # correction after resume. Give each parameter its own copy.
        def _load_state_dict(self, state_dict, _orig_load=dopt.load_state_dict):
            _orig_load(self, state_dict)
            for state in self.optimizer.state.values():
                if "step" in state and torch.is_tensor(state["step"]):
                    state["step"] = state["step"].detach().clone()

        dopt._set_main_param_and_optimizer_states = _set_states
        dopt.load_state_dict = _load_state_dict
    _state["megatron"] = True


def _tensor_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's `maybe_move_tensor_to_cpu` for CPU tensors: numpy when asked."""
    if torch.is_tensor(tensor) and not tensor.is_cuda:
        return tensor.numpy() if as_numpy else tensor
    return _orig["to_host"](tensor, as_numpy=as_numpy, record_stream=record_stream)


def _gather_along_first_dim_v(input_, group, output_split_sizes=None, use_global_buffer=False):
    """megatron's first-dim all-gather; unequal pieces (`output_split_sizes`) padded to the
    largest, gathered as equal ones, then cut back."""
    sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
    if sizes is None or group.size() == 1 or len(set(sizes)) == 1:
        return _orig["gather_first"](input_, group, output_split_sizes, use_global_buffer)
    most = max(sizes)
    padded = input_.new_zeros((most, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    out = input_.new_empty((most * group.size(), *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * most: r * most + n] for r, n in enumerate(sizes)])


def _reduce_scatter_along_first_dim_v(input_, group, input_split_sizes=None,
                                      use_global_buffer=False):
    """megatron's first-dim reduce-scatter; with unequal pieces (`input_split_sizes`) a sum over
    the group of the whole input, of which this rank keeps its piece."""
    sizes = None if input_split_sizes is None else [int(n) for n in input_split_sizes]
    if sizes is None or group.size() == 1:
        return _orig["reduce_scatter_first"](input_, group, input_split_sizes, use_global_buffer)
    total = input_.contiguous().clone()
    torch.distributed.all_reduce(total, group=group)
    start = sum(sizes[: group.rank()])
    return total[start: start + sizes[group.rank()]].clone()


def _quiet_expected_warnings() -> None:
    """Silence warnings that every CPU run triggers by design (they say nothing actionable)."""
    for msg in (r".*Apex is not installed.*", r".*Transformer Engine and Apex are not installed.*",
                r".*not a leaf Tensor is being accessed.*",  # .grad reads seen by the device mode
                r".*(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
                r".*full scope is deprecated.*", r".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=msg)


def activate() -> bool:
    """Install the layer if CUDA is unavailable. Returns whether it is active."""
    if not is_active():
        return False
    if not _state["torch"]:
        _quiet_expected_warnings()
        _patch_torch()
        _state["torch"] = True
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return True
    patch_megatron()
    return True
