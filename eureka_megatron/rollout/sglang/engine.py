"""`SGLangEngine`: the RolloutEngine seam over one SGLang HTTP server (launched here or running).

Routes (SGLang 0.5.23, sglang/srt/entrypoints/http_server.py): /generate, /health_generate,
/health, /model_info, /server_info, /pause_generation, /continue_generation, /flush_cache,
/begin_weight_update, /end_weight_update, /update_weights_from_tensor,
/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
/release_memory_occupation, /resume_memory_occupation.

Weight versions: the engine's `weight_version` is None from the moment a sync starts until its
last bucket is loaded and the server reports that version; in between (and after a failure or a
restart) `generate` raises StaleWeightsError, and a failed sync leaves the server paused, so it
serves nothing half-updated. Every /generate answer carries the server's version
(`meta_info.weight_version`), which must equal ours.

A sync (both transports) is one SGLang weight-update session:
pause -> flush -> /begin_weight_update -> the buckets (weight_version on the last) ->
/end_weight_update -> check the reported version -> continue. SGLang refuses weight updates
outside a session; a session is closed again when a sync fails, so the next one can open.
- transport "tensor" (colocated, slime's path): per bucket and dtype one fresh flat buffer,
  serialized (CUDA tensors as IPC handles, CPU tensors by value; payload.py) and posted with
  load_format="flattened_bucket".
- transport "distributed" (engines on GPUs of their own): per bucket and dtype one
  /update_weights_from_distributed (load_format="flattened_bucket") while the group's source
  broadcasts the flat buffer's bytes. The source is another process -- one sender per pipeline
  stage, each with a group of its own (`receive_weights`, driven by rollout/weight_broadcast.py:
  the trainer's ranks) -- or this one (`update_weights`: the trainer end of one group is built
  here, update_group.py). Groups are kept between syncs and left after a failure.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from eureka_megatron.rollout.bucket_stream import SyncAborted
from eureka_megatron.rollout.buckets import FlatTensorMeta, flatten_bucket
from eureka_megatron.rollout.engine import (EngineDeadError, GroupJoin, NamedTensors, Prompt,
                                            ReceiverInfo, Sample, SamplingParams,
                                            StaleWeightsError)
from eureka_megatron.rollout.sglang.flags import (DETERMINISTIC_FLAG, WEIGHTS_BACKUP_FLAG,
                                                  server_flags, validate_server_flags)
from eureka_megatron.rollout.sglang.http import (SGLangHTTP, SGLangHTTPError, SGLangRefused,
                                                 Transport)
from eureka_megatron.rollout.sglang.payload import serialize_flat_bucket
from eureka_megatron.rollout.sglang.process import ServerProcess
from eureka_megatron.rollout.sglang.prompts import (FAMILY_OF_MODEL_TYPE, RequestAborted,
                                                    generate_bodies, parse_sample)
from eureka_megatron.rollout.sglang.update_group import (DEFAULT_GROUP_NAME, WeightUpdateGroup,
                                                         address_facing)
from eureka_megatron.runtime.ports import free_port

ALL_MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's memory-saver tags
TRANSPORTS = ("tensor", "distributed")


class SGLangEngine:
    """RolloutEngine over an SGLang HTTP server. Build with `launch` or `connect`.

    family: the model family ("qwen2_5_vl" | "internvl"), for image placeholders; read from the
        checkpoint (launch) or /model_info (connect) when not given.
    deterministic: the server runs with --enable-deterministic-inference, so per-request
        sampling_seed is honoured (seeded rollouts repeat; samples equal across engine counts).
        Without it SGLang ignores seeds and samples with `n` in one request.
    weight_transport: "tensor" (colocated) or "distributed" (a broadcast group; see module doc).
    transport: the HTTP transport (default: requests; tests drive SGLang's app in-process)."""

    weight_layout = "disk"  # SGLang loads the checkpoint's on-disk HF names

    def __init__(self, url: str, *, tp_size: int = 1, weight_version: int | None = None,
                 family: str | None = None, deterministic: bool = False,
                 weight_transport: str = "tensor", update_group_backend: str | None = None,
                 weights_cpu_backup: bool = False, api_key: str | None = None,
                 transport: Transport | None = None, request_timeout: float = 3600.0,
                 control_timeout: float = 600.0, health_timeout: float = 5.0,
                 startup_timeout: float = 900.0, max_concurrency: int = 64,
                 process: ServerProcess | None = None):
        if weight_transport not in TRANSPORTS:
            raise ValueError(f"weight_transport must be one of {TRANSPORTS}, got "
                             f"{weight_transport!r}")
        self.http = SGLangHTTP(url, api_key=api_key, transport=transport)
        self.url = self.http.url
        self.tp_size, self.family, self.deterministic = tp_size, family, deterministic
        self.weight_transport = weight_transport
        self.update_group_backend = update_group_backend  # None: nccl with CUDA, else gloo
        self.weights_cpu_backup = weights_cpu_backup  # weights survive release_memory
        self.request_timeout, self.control_timeout = request_timeout, control_timeout
        self.health_timeout, self.startup_timeout = health_timeout, startup_timeout
        self.max_concurrency = max_concurrency
        self.process = process
        self._version = weight_version
        self._released: set[str] = set()
        self._paused_by_us = False          # a sync of this engine holds the server paused
        self._update_group: WeightUpdateGroup | None = None  # a source in this process
        self._groups: set[str] = set()      # weight-update groups the server has joined
        self._lock = threading.Lock()       # version / memory state
        self._sync_lock = threading.Lock()  # one weight update at a time

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def launch(cls, model_path: str, *, tp: int = 1, mem_fraction_static: float | None = None,
               host: str = "127.0.0.1", port: int | None = None, deterministic: bool = False,
               extra_args: Sequence[str] | None = None, env: dict[str, str] | None = None,
               weight_version: int | None = 0, command: Sequence[str] | None = None,
               log_path: str | None = None, **engine_kw) -> "SGLangEngine":
        """Start `python -m sglang.launch_server` (bound to `host`, localhost by default) and wait
        until /health_generate answers.

        weight_version: the version the checkpoint at model_path stands for (0 = the trainer's
            initial weights); None makes the engine refuse to generate until the first sync.
        deterministic: pass --enable-deterministic-inference (seeds honoured; slower kernels).
        command: replaces the sglang command line (tests); "{host}" / "{port}" are filled in.
        Extra keyword arguments go to the constructor (timeouts, family, weight_transport...)."""
        port = port or free_port(host)
        extra = [str(a) for a in (extra_args or ())]
        if command is None:
            flags = server_flags(model_path, tp=tp, mem_fraction_static=mem_fraction_static,
                                 host=host, port=port, weight_version=weight_version,
                                 deterministic=deterministic, extra_args=extra)
            validate_server_flags(flags)
            cmd = [sys.executable, "-m", "sglang.launch_server", *flags]
        else:
            cmd = [str(c).replace("{host}", host).replace("{port}", str(port)) for c in command]
        engine_kw.setdefault("weights_cpu_backup", WEIGHTS_BACKUP_FLAG in extra)
        engine_kw.setdefault("family", family_of_checkpoint(model_path))
        url_host = f"[{host}]" if ":" in host else host
        engine = cls(f"http://{url_host}:{port}", tp_size=tp, weight_version=weight_version,
                     deterministic=deterministic or DETERMINISTIC_FLAG in extra,
                     process=ServerProcess(cmd, env=env, log_path=log_path), **engine_kw)
        engine._start()
        return engine

    @classmethod
    def connect(cls, url: str, *, tp_size: int | None = None, **engine_kw) -> "SGLangEngine":
        """An engine for a running server: its version (when an integer; else None: sync before
        generating), model family, TP size and deterministic mode as the server reports them."""
        engine = cls(url, **engine_kw)
        info = engine.model_info()  # EngineDeadError when nobody answers
        reported = info.get("weight_version")
        engine._version = (int(reported) if reported is not None and str(reported).isdigit()
                           else None)
        if engine.family is None:
            engine.family = FAMILY_OF_MODEL_TYPE.get(info.get("model_type"))
        server = engine.server_info()
        engine.tp_size = int(tp_size or server.get("tp_size") or 1)
        if "deterministic" not in engine_kw:
            engine.deterministic = bool(server.get("enable_deterministic_inference", False))
        return engine

    # --- RolloutEngine ------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        return self._version

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, prompt i's at [i*n, (i+1)*n); one request per prompt, requests
        in parallel. Seeds are sent only to a deterministic server (see the class doc).

        SGLang's output_token_logprobs are log_softmax(logits / T) before top-k / top-p, the
        engine.py contract, unless the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB set."""
        sampling.validate()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        with self._lock:
            version = self._version
            if self._released:
                raise RuntimeError(f"{self.url}: memory released ({sorted(self._released)}); "
                                   "call resume_memory() first")
        if version is None:
            raise StaleWeightsError(f"{self.url}: weights are not a complete known version "
                                    "(interrupted sync or restart); sync weights first")
        if not prompts:
            return []
        per_prompt = [generate_bodies(p, i, n, sampling, family=self.family,
                                      seeded=self.deterministic) for i, p in enumerate(prompts)]
        bodies = [b for group in per_prompt for b in group]
        workers = max(1, min(self.max_concurrency, len(bodies)))
        with ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(
                lambda b: self.http.post("/generate", b, timeout=self.request_timeout), bodies))
        samples, first = [], 0
        for i, group in enumerate(per_prompt):
            outs = []
            for out in answers[first:first + len(group)]:  # a prompt's requests, in order
                outs += out if isinstance(out, list) else [out]
            first += len(group)
            if len(outs) != n:
                raise RuntimeError(f"{self.url}: /generate gave {len(outs)} outputs, wanted {n}")
            expected = len(prompts[i].input_ids) if prompts[i].input_ids else None
            try:
                samples += [parse_sample(o, i, version, expected, self.url,
                                         sampling.return_routed_experts) for o in outs]
            except RequestAborted as e:
                if self._version != version:
                    raise StaleWeightsError(str(e)) from None
                raise
        if self._version != version:
            raise StaleWeightsError(f"{self.url}: a weight sync started during generate")
        return samples

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Load `buckets` (HF-named full tensors) as `version`, in one weight-update session.

        Transport "tensor": every engine TP rank receives the same payload, right for TP=1 and
        for CPU tensors; CUDA tensors go as IPC handles of this process's GPU. Each flat buffer
        is dropped as soon as the server has loaded it (at most one alive at a time)."""
        _check_version(version)
        flats = (flat for bucket in buckets if bucket for flat in flatten_bucket(bucket))
        with self._sync_lock:
            self._set_version(None)  # from here until the commit, whatever happens
            self._check_weights_held()
            first = next(flats, None)
            if first is None:
                raise ValueError("update_weights got no tensors")
            send = (self._send_tensor if self.weight_transport == "tensor"
                    else self._send_distributed)
            with self._session(version):
                cur = first
                while cur is not None:
                    nxt = next(flats, None)
                    send(cur, version if nxt is None else None)
                    cur = nxt  # the sent buffer is referenced by nobody now
            self._set_version(version)

    def receive_weights(self, stages: Sequence[tuple[str, Sequence[Sequence[FlatTensorMeta]]]],
                        version: int, *, abort, join: GroupJoin | None = None) -> None:
        """Load `version` from broadcasts by sources in other processes, in one session:
        `stages` is, per weight-update group, the metadata of each flat buffer its source
        broadcasts, in the order it sends them; groups are served one after the other and the
        version goes with the very last buffer, so it is committed only when every group's
        buffers have landed. `join`: join these groups first (each request waits until its
        source has joined too). `abort` (`is_set()` / `set()`, shared with the sources): checked
        before every request and set on any failure, so the sources stop waiting for us."""
        _check_version(version)
        requests = [(name, metas) for name, per_group in stages for metas in per_group]
        with self._sync_lock:
            self._set_version(None)
            try:
                self._check_weights_held()
                if not requests:
                    raise ValueError("receive_weights got no tensors")
                if join is not None:
                    for name, address, port in join.groups:
                        self.init_weight_update_group(address, port, join.rank_offset,
                                                      join.world_size, name, join.backend)
                        self._groups.add(name)
                with self._session(version):
                    for k, (name, metas) in enumerate(requests):
                        if abort.is_set():
                            raise SyncAborted(f"{self.url}: the weight sync failed elsewhere")
                        last = k == len(requests) - 1
                        self.update_weights_from_distributed(
                            [m.name for m in metas], [m.dtype for m in metas],
                            [m.shape for m in metas], group_name=name,
                            version=version if last else None)
            except BaseException:
                abort.set()
                raise
            self._set_version(version)

    def receiver_info(self) -> ReceiverInfo:
        return ReceiverInfo(self.url, self.tp_size, self._group_backend(), self.control_timeout,
                            frozenset(self._groups))

    def leave_weight_groups(self) -> None:
        """Drop this engine's weight-update groups (a source built here included), on both
        ends; a server that is gone has none left to drop."""
        group, self._update_group = self._update_group, None
        if group is not None:
            group.destroy()
        for name in sorted(self._groups):
            try:
                self.destroy_weight_update_group(name)
            except (EngineDeadError, SGLangHTTPError, SGLangRefused):
                pass  # a restarted or dead server has no group to destroy
        self._groups.clear()

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free GPU memory (None = all of weights, kv_cache, cuda_graph); needs the server started
        with --enable-memory-saver. Released weights are gone (version None) unless the server
        keeps a CPU backup (--enable-weights-cpu-backup)."""
        self.flush_cache()  # SGLang releases only an idle engine
        tags = list(tags) if tags else list(ALL_MEMORY_TAGS)
        self.http.post("/release_memory_occupation", {"tags": tags}, timeout=self.control_timeout)
        with self._lock:
            self._released |= set(tags)
            if "weights" in tags and not self.weights_cpu_backup:
                self._version = None

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back what release_memory freed (None = everything released). The tags are
        always named: SGLang's resume without tags resumes every tag and fails (KeyError,
        server-side) on one that was not released."""
        with self._lock:
            tags = [t for t in (tags or ALL_MEMORY_TAGS) if t in self._released]
        if not tags:
            return
        self.http.post("/resume_memory_occupation", {"tags": tags}, timeout=self.control_timeout)
        with self._lock:
            self._released -= set(tags)

    def health(self) -> bool:
        """The server answers: /health_generate (one generated token) within health_timeout,
        or /server_info (its scheduler's state) while this engine holds it paused for a sync:
        SGLang's /health_generate and /health both wait for a generated token, which a pause
        stops, and would read a paused server as dead."""
        if self.process is not None and not self.process.running:
            return False
        path = "/server_info" if self._paused_by_us else "/health_generate"
        try:
            self.http.get(path, timeout=self.health_timeout)
            return True
        except (EngineDeadError, SGLangHTTPError):
            return False

    def restart(self) -> None:
        """Start over at version None (weights unknown until the next sync). A server this
        process launched is killed and started again; a server we connected to is kept: its
        weight-update group and any session a failed sync left open are closed, and it must
        answer /health."""
        self.leave_weight_groups()
        with self._lock:
            self._version = None
        if self.process is None:
            self._close_session_quietly()
            self.server_info()  # EngineDeadError if it is gone
            return
        self.process.kill()
        with self._lock:
            self._released = set()
        self._paused_by_us = False
        self._start()

    def shutdown(self) -> None:
        """Stop the server if this process launched it."""
        self.leave_weight_groups()
        if self.process is not None:
            self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self) -> str:
        return f"SGLangEngine({self.url}, tp={self.tp_size}, version={self._version})"

    # --- SGLang's control requests ------------------------------------------------------------

    def model_info(self) -> dict:
        return self._get_current("/model_info", "/get_model_info")

    def server_info(self) -> dict:
        return self._get_current("/server_info", "/get_server_info")

    def get_server_weight_version(self) -> str | None:
        """The version label the server reports (None when it reports none)."""
        v = self.model_info().get("weight_version")
        return None if v is None else str(v)

    def pause_generation(self) -> None:
        """SGLang's default mode ("abort"): running requests end with finish_reason abort."""
        self.http.post("/pause_generation", {}, timeout=self.control_timeout)

    def continue_generation(self) -> None:
        self.http.post("/continue_generation", {}, timeout=self.control_timeout)

    def flush_cache(self, timeout: float = 60.0) -> None:
        """Flush the radix cache; SGLang refuses (400) while requests run, so retry a while."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.http.post("/flush_cache", {}, timeout=self.control_timeout)
                return
            except SGLangHTTPError as e:
                if e.status != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def begin_weight_update(self) -> None:
        """Open SGLang's weight-update session. One left open by a sync that died with its
        client (the server refuses: "already open") is closed and opened again: this engine is
        the server's only weight writer."""
        try:
            self.http.checked("/begin_weight_update", {}, timeout=self.control_timeout)
        except SGLangRefused as e:
            if "already open" not in e.message:
                raise
            self.end_weight_update()
            self.http.checked("/begin_weight_update", {}, timeout=self.control_timeout)

    def end_weight_update(self) -> None:
        self.http.checked("/end_weight_update", {}, timeout=self.control_timeout)

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, group_name: str = DEFAULT_GROUP_NAME,
                                 backend: str = "nccl") -> None:
        """Make the engine's TP ranks join a group with the trainer's source rank (rank 0;
        engine rank r joins as rank_offset + r). The trainer's side (update_group.py) must
        join concurrently: both block until all members joined."""
        self.http.checked("/init_weights_update_group", dict(
            master_address=master_address, master_port=int(master_port),
            rank_offset=int(rank_offset), world_size=int(world_size), group_name=group_name,
            backend=backend), timeout=self.control_timeout)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[Any],
                                        shapes: Sequence[Sequence[int]], *,
                                        group_name: str = DEFAULT_GROUP_NAME,
                                        version: int | None = None,
                                        load_format: str | None = "flattened_bucket") -> None:
        """One bucket of a distributed update, inside a session: the engine allocates these
        tensors and receives them by broadcast from rank 0 (blocks until the broadcast ends;
        issue it from a thread). flattened_bucket: one broadcast of the tensors' bytes, packed in
        this order (SGLang's FlattenedTensorBucket.empty layout); None: one per tensor."""
        body = dict(names=list(names), shapes=[[int(d) for d in s] for s in shapes],
                    dtypes=[str(d).removeprefix("torch.") for d in dtypes],
                    group_name=group_name, flush_cache=version is not None,
                    load_format=load_format)
        if version is not None:
            body["weight_version"] = str(version)
        self.http.checked("/update_weights_from_distributed", body,
                          timeout=self.request_timeout)

    def destroy_weight_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> None:
        self.http.checked("/destroy_weights_update_group", {"group_name": group_name},
                          timeout=self.control_timeout)

    # --- internals ----------------------------------------------------------------------------

    def _set_version(self, version: int | None) -> None:
        with self._lock:
            self._version = version

    def _check_weights_held(self) -> None:
        if "weights" in self._released:
            raise RuntimeError(f"{self.url}: weights are released; "
                               "resume_memory(['weights']) before a weight sync")

    def _group_backend(self) -> str:
        return self.update_group_backend or ("nccl" if torch.cuda.is_available() else "gloo")

    @contextmanager
    def _session(self, version: int):
        """pause -> flush -> begin ... end -> version check -> continue. On failure the session
        is closed (best effort) and the server left paused at version None."""
        self._paused_by_us = True
        self.pause_generation()
        self.flush_cache()
        self.begin_weight_update()
        try:
            yield
        except BaseException:
            self._close_session_quietly()
            raise
        self.end_weight_update()
        reported = self.get_server_weight_version()
        if reported is not None and reported != str(version):
            raise RuntimeError(f"{self.url}: server reports weight version {reported!r} after "
                               f"syncing version {version}")
        self.continue_generation()
        self._paused_by_us = False

    def _close_session_quietly(self) -> None:
        try:
            self.end_weight_update()
        except (EngineDeadError, SGLangHTTPError, SGLangRefused):
            pass  # none open, or a dead server: the error that matters is raised elsewhere

    def _send_tensor(self, flat, version: int | None) -> None:
        body = {"serialized_named_tensors": [serialize_flat_bucket(flat)] * self.tp_size,
                "load_format": "flattened_bucket", "flush_cache": version is not None}
        if version is not None:
            body["weight_version"] = str(version)
        self.http.checked("/update_weights_from_tensor", body, timeout=self.request_timeout)
        if flat.tensor.is_cuda:
            torch.cuda.ipc_collect()  # return blocks the server has closed

    def _send_distributed(self, flat, version: int | None) -> None:
        group = self._ensure_update_group()
        metas = flat.metadata
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(self.update_weights_from_distributed,
                                 [m.name for m in metas], [m.dtype for m in metas],
                                 [m.shape for m in metas], group_name=group.group_name,
                                 version=version)
            data = flat.tensor.view(torch.uint8)
            if group.backend == "nccl" and not data.is_cuda:
                data = data.cuda()
            work = group.broadcast(data)
            try:
                answer.result()
            except BaseException:
                self.leave_weight_groups()  # a refused receive leaves our broadcast unmatched
                raise
            work.wait()

    def _ensure_update_group(self) -> WeightUpdateGroup:
        if self._update_group is not None:
            return self._update_group
        backend = self._group_backend()
        address = address_facing(self.url)
        port = WeightUpdateGroup.pick_port(address)
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(self.init_weight_update_group, address, port, 1,
                                 1 + self.tp_size, backend=backend)
            group = WeightUpdateGroup(address, port, 1 + self.tp_size, backend=backend,
                                      timeout=self.control_timeout)
            try:
                joined.result()
            except BaseException:
                group.destroy()
                raise
        self._update_group = group
        self._groups.add(group.group_name)
        return group

    def _get_current(self, path: str, deprecated: str) -> dict:
        """GET a route, falling back to its deprecated name on servers older than 0.5.23."""
        try:
            out = self.http.get(path, timeout=self.control_timeout)
        except SGLangHTTPError as e:
            if e.status != 404:
                raise
            out = self.http.get(deprecated, timeout=self.control_timeout)
        return out if isinstance(out, dict) else {}

    def _start(self) -> None:
        self.process.start(self.url, self._healthy_now, self.startup_timeout)

    def _healthy_now(self) -> bool:
        try:
            self.http.get("/health_generate", timeout=self.health_timeout)
            return True
        except (EngineDeadError, SGLangHTTPError):
            return False


def _check_version(version) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")


def family_of_checkpoint(model_path: str | Path) -> str | None:
    """The model family of an HF checkpoint directory (None when unknown or not local)."""
    try:
        model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return FAMILY_OF_MODEL_TYPE.get(model_type)
