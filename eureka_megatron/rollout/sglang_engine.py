"""`SGLangEngine`: the RolloutEngine seam over one SGLang HTTP server (launched here or running).

Endpoints (SGLang 0.5.x, `python/sglang/srt/entrypoints/http_server.py`): /generate,
/health_generate, /get_weight_version (fallback /get_model_info), /pause_generation,
/continue_generation, /flush_cache, /update_weights_from_tensor, /init_weights_update_group,
/update_weights_from_distributed, /destroy_weights_update_group, /release_memory_occupation,
/resume_memory_occupation. Only the standard library speaks HTTP (no new dependency).

Weight versions: the engine's `weight_version` is None from the moment a sync starts until its
last bucket is loaded and the server reports that version; in between (and after a failure or a
restart) `generate` raises StaleWeightsError, and a failed sync leaves the server paused, so it
serves nothing half-updated. Every /generate answer carries the server's version
(`meta_info.weight_version`), which must equal ours.

Colocated sync (slime's path): pause -> flush -> per bucket and dtype one fresh flat buffer,
serialized (CUDA tensors as IPC handles) and posted with load_format="flattened_bucket" ->
continue. Disaggregated sync: the trainer broadcasts over an NCCL group that the engine joined
(`init_weight_update_group`), see `update_weights_from_distributed`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any, Iterable, Iterator, Sequence

import torch

from eureka_megatron.rollout.buckets import FlatBucket, flatten_bucket
from eureka_megatron.rollout.engine import (EngineDeadError, NamedTensors, Prompt, Sample,
                                            SamplingParams, StaleWeightsError)
from eureka_megatron.rollout.sglang_payload import (_sglang_transport, deserialize_payload,  # noqa: F401
                                                    serialize_payload, sglang_available)

ALL_MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's memory-saver tags


class SGLangHTTPError(RuntimeError):
    """The server answered with an HTTP error status."""

    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


# --- server command line --------------------------------------------------------------------------

def server_flags(model_path: str, *, tp: int = 1, mem_fraction_static: float | None = None,
                 host: str = "127.0.0.1", port: int = 30000, weight_version: int | None = 0,
                 extra_args: Sequence[str] | None = None) -> list[str]:
    """`python -m sglang.launch_server` flags (names as ServerArgs.add_cli_args spells them)."""
    flags = ["--model-path", str(model_path), "--tp-size", str(tp), "--host", host,
             "--port", str(port)]
    if mem_fraction_static is not None:
        flags += ["--mem-fraction-static", str(mem_fraction_static)]
    if weight_version is not None:
        flags += ["--weight-version", str(weight_version)]
    return flags + [str(a) for a in (extra_args or ())]


def validate_server_flags(flags: Sequence[str]) -> None:
    """Parse `flags` with the installed sglang's own ServerArgs parser (no-op without sglang).

    The parser checks names, types and choices against that version; constructing ServerArgs
    itself would run its __post_init__, which probes GPUs and the model config in this process."""
    if not sglang_available():
        return
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    try:
        parser.parse_args(list(flags))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"invalid SGLang server arguments {list(flags)}: {e}") from e


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _image_item(img: Any) -> str:
    """SGLang image_data item: paths / URLs / data URIs pass through (the server must be able to
    read the path); bytes and PIL images become base64 PNG data URIs."""
    if isinstance(img, os.PathLike):
        return os.fspath(img)
    if isinstance(img, str):
        return img
    if isinstance(img, (bytes, bytearray)):
        return base64.b64encode(bytes(img)).decode("ascii")
    if hasattr(img, "save"):  # PIL.Image
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    raise TypeError(f"unsupported image type {type(img).__name__} (path, URL, bytes or PIL)")


# --- the engine -----------------------------------------------------------------------------------

class SGLangEngine:
    """RolloutEngine over an SGLang HTTP server. Build with `launch` or `connect`."""

    def __init__(self, url: str, *, tp_size: int = 1, weight_version: int | None = None,
                 weight_layout: str = "disk", use_sglang_serializer: bool | None = None,
                 weights_cpu_backup: bool = False, api_key: str | None = None,
                 request_timeout: float = 3600.0, control_timeout: float = 600.0,
                 health_timeout: float = 5.0, startup_timeout: float = 900.0,
                 max_concurrency: int = 64, launch_command: list[str] | None = None,
                 env: dict[str, str] | None = None, log_path: str | None = None,
                 process: subprocess.Popen | None = None):
        self.url = url.rstrip("/")
        self.tp_size = tp_size
        self.weight_layout = weight_layout  # SGLang loads the checkpoint's on-disk HF names
        self.use_sglang_serializer = use_sglang_serializer
        self.weights_cpu_backup = weights_cpu_backup  # weights survive release_memory
        self.api_key = api_key
        self.request_timeout, self.control_timeout = request_timeout, control_timeout
        self.health_timeout, self.startup_timeout = health_timeout, startup_timeout
        self.max_concurrency = max_concurrency
        self.launch_command, self.env, self.log_path = launch_command, env, log_path
        self._process = process
        self._version = weight_version
        self._released: set[str] = set()
        self._lock = threading.Lock()       # version / memory state
        self._sync_lock = threading.Lock()  # one weight update at a time
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never proxy

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def launch(cls, model_path: str, *, tp: int = 1, mem_fraction_static: float | None = None,
               host: str = "127.0.0.1", port: int | None = None,
               extra_args: Sequence[str] | None = None, env: dict[str, str] | None = None,
               weight_version: int | None = 0, command: Sequence[str] | None = None,
               log_path: str | None = None, **engine_kw) -> "SGLangEngine":
        """Start `python -m sglang.launch_server` (bound to `host`, localhost by default) and wait
        until /health_generate answers.

        weight_version: the version the checkpoint at model_path stands for (0 = the trainer's
            initial weights); None makes the engine refuse to generate until the first sync.
        command: replaces the sglang command line (tests); "{host}" / "{port}" are filled in.
        Extra keyword arguments go to the constructor (timeouts, weight_layout, ...)."""
        port = port or _free_port(host)
        if command is None:
            flags = server_flags(model_path, tp=tp, mem_fraction_static=mem_fraction_static,
                                 host=host, port=port, weight_version=weight_version,
                                 extra_args=extra_args)
            validate_server_flags(flags)
            cmd = [sys.executable, "-m", "sglang.launch_server", *flags]
            engine_kw.setdefault("weights_cpu_backup",
                                 "--enable-weights-cpu-backup" in (extra_args or ()))
        else:
            cmd = [str(c).replace("{host}", host).replace("{port}", str(port)) for c in command]
        url_host = f"[{host}]" if ":" in host else host
        engine = cls(f"http://{url_host}:{port}", tp_size=tp, weight_version=weight_version,
                     launch_command=cmd, env=env, log_path=log_path, **engine_kw)
        engine._start()
        return engine

    @classmethod
    def connect(cls, url: str, *, tp_size: int | None = None, **engine_kw) -> "SGLangEngine":
        """An engine for a running server; its version is what the server reports when that is
        an integer (else None: sync before generating)."""
        engine = cls(url, **engine_kw)
        reported = engine.get_server_weight_version()  # EngineDeadError when nobody answers
        if tp_size is None:
            try:
                tp_size = int(engine._get("/get_server_info", timeout=engine.control_timeout)
                              .get("tp_size", 1))
            except (SGLangHTTPError, AttributeError, TypeError, ValueError):
                tp_size = 1
        engine.tp_size = tp_size
        engine._version = int(reported) if reported is not None and reported.isdigit() else None
        return engine

    # --- RolloutEngine ------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        return self._version

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, prompt i's at [i*n, (i+1)*n); one request per prompt (the n
        parameter, or a batch with per-sample seeds), requests in parallel.

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
        bodies = [self._generate_body(p, i, n, sampling) for i, p in enumerate(prompts)]
        workers = max(1, min(self.max_concurrency, len(bodies)))
        with ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(
                lambda b: self._post("/generate", b, timeout=self.request_timeout), bodies))
        samples = []
        for i, out in enumerate(answers):
            outs = out if isinstance(out, list) else [out]
            if len(outs) != n:
                raise RuntimeError(f"{self.url}: /generate gave {len(outs)} outputs, wanted {n}")
            samples += [self._parse_output(o, i, version) for o in outs]
        if self._version != version:
            raise StaleWeightsError(f"{self.url}: a weight sync started during generate")
        return samples

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Colocated sync: each bucket's tensors, one fresh flat buffer per dtype, through
        /update_weights_from_tensor (load_format="flattened_bucket").

        Every engine TP rank receives the same payload: right for TP=1 and for CPU tensors; a
        TP>1 engine colocated with CUDA tensors should get each rank's own GPU copy through
        `update_weights_serialized`. Sends one request ahead of the last (so the last one can
        carry weight_version), i.e. up to two buckets' buffers are alive at once."""
        def requests():
            for bucket in buckets:
                if not bucket:
                    continue
                serialized, flats = self.serialize_bucket(bucket)
                del bucket
                while flats:  # pop: a posted buffer is referenced by nobody here
                    yield [serialized.pop(0)] * self.tp_size, flats.pop(0)
        self._sync(requests(), version)

    def update_weights_serialized(self, requests: Iterable[Sequence[str]], version: int) -> None:
        """Multi-rank colocated sync. Each item is one request's `serialized_named_tensors`: one
        `serialize_bucket` string per engine TP rank, in TP-rank order (slime: every training
        rank of the engine's GPUs serializes its dtype group, a gloo `gather_object` collects
        them on the engine's first rank, which calls this; a rank without tensors for a dtype
        sends an empty flat buffer). Keep the serialized buffers alive until this returns."""
        def checked():
            for payloads in requests:
                payloads = list(payloads)
                if len(payloads) != self.tp_size:
                    raise ValueError(f"{len(payloads)} payloads for a TP={self.tp_size} engine")
                yield payloads, None
        self._sync(checked(), version)

    def serialize_bucket(self, named: NamedTensors) -> tuple[list[str], list[FlatBucket]]:
        """One serialized flattened_bucket payload per dtype, plus the flat buffers (keep them
        alive until the server has loaded them)."""
        use_sglang = (sglang_available() if self.use_sglang_serializer is None
                      else self.use_sglang_serializer)
        meta_cls = _sglang_transport()[1] if use_sglang else None
        flats = flatten_bucket(named)
        return [serialize_payload(f.payload(meta_cls), use_sglang=use_sglang) for f in flats], flats

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free GPU memory (None = all of weights, kv_cache, cuda_graph); needs the server started
        with --enable-memory-saver. Released weights are gone (version None) unless the server
        keeps a CPU backup (--enable-weights-cpu-backup)."""
        self.flush_cache()  # SGLang releases only an idle engine
        self._post("/release_memory_occupation", {"tags": list(tags) if tags else None},
                   timeout=self.control_timeout)
        released = set(tags or ALL_MEMORY_TAGS)
        with self._lock:
            self._released |= released
            if "weights" in released and not self.weights_cpu_backup:
                self._version = None

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        self._post("/resume_memory_occupation", {"tags": list(tags) if tags else None},
                   timeout=self.control_timeout)
        with self._lock:
            self._released = self._released - set(tags) if tags else set()

    def health(self) -> bool:
        """/health_generate (one generated token) answers 200 within health_timeout."""
        if self._process is not None and self._process.poll() is not None:
            return False
        try:
            self._get("/health_generate", timeout=self.health_timeout)
            return True
        except (EngineDeadError, SGLangHTTPError):
            return False

    def restart(self) -> None:
        """Kill the server we launched and start the same command again; weights unknown
        (version None) until the next sync."""
        if not self.launch_command:
            raise RuntimeError(f"{self.url}: cannot restart an engine this process did not launch")
        self._kill()
        with self._lock:
            self._version = None
            self._released = set()
        self._start()

    # --- control requests ---------------------------------------------------------------------

    def pause_generation(self) -> None:
        self._post("/pause_generation", {}, timeout=self.control_timeout)

    def continue_generation(self) -> None:
        self._post("/continue_generation", {}, timeout=self.control_timeout)

    def flush_cache(self, timeout: float = 60.0) -> None:
        """Flush the radix cache; SGLang refuses (400) while requests run, so retry a while."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._post("/flush_cache", {}, timeout=self.control_timeout)
                return
            except SGLangHTTPError as e:
                if e.status != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def get_server_weight_version(self) -> str | None:
        """The version label the server reports (None when this SGLang does not report one)."""
        for path in ("/get_weight_version", "/get_model_info"):
            try:
                v = self._get(path, timeout=self.control_timeout)
            except SGLangHTTPError as e:
                if e.status == 404:
                    continue
                raise
            v = v.get("weight_version") if isinstance(v, dict) else None
            return None if v is None else str(v)
        return None

    def begin_weight_update(self) -> None:
        """Disaggregated sync, step 1: version None, pause, flush."""
        self._set_version(None)
        self.pause_generation()
        self.flush_cache()

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, group_name: str = "weight_update_group",
                                 backend: str = "nccl") -> None:
        """Make the engine's TP ranks join an NCCL group with the trainer's source rank (rank 0;
        engine rank r joins as rank_offset + r). The trainer must create its side of the group
        (same address, port, world size) concurrently: both block until all members joined."""
        self._checked("/init_weights_update_group", dict(
            master_address=master_address, master_port=int(master_port),
            rank_offset=int(rank_offset), world_size=int(world_size), group_name=group_name,
            backend=backend))

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[Any],
                                        shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group",
                                        version: int | None = None) -> None:
        """One bucket of a disaggregated sync: the engine allocates `names` with these dtypes and
        shapes and receives them by `dist.broadcast(src=0)` over `group_name`, in this order.

        Protocol: begin_weight_update(); per bucket, this call (it blocks until the broadcasts
        end, so issue it from a thread) while the trainer broadcasts the same tensors in order;
        `version` None for every bucket but the last, which passes the new version; then
        continue_generation(). The version is committed only once the last bucket is loaded and
        the server reports it."""
        self._set_version(None)
        body = dict(names=list(names), shapes=[[int(d) for d in s] for s in shapes],
                    dtypes=[str(d).removeprefix("torch.") for d in dtypes],
                    group_name=group_name, flush_cache=version is not None)
        if version is not None:
            body["weight_version"] = str(version)
        self._checked("/update_weights_from_distributed", body)
        if version is not None:
            self._commit(version)

    def destroy_weight_update_group(self, group_name: str = "weight_update_group") -> None:
        self._checked("/destroy_weights_update_group", {"group_name": group_name})

    def shutdown(self) -> None:
        """Stop the server if this process launched it."""
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self) -> str:
        return f"SGLangEngine({self.url}, tp={self.tp_size}, version={self._version})"

    # --- internals ----------------------------------------------------------------------------

    def _set_version(self, version: int | None) -> None:
        with self._lock:
            self._version = version

    def _sync(self, requests: Iterator[tuple[list[str], Any]], version: int) -> None:
        """pause -> flush -> every request (weight_version on the last) -> check -> continue."""
        self._set_version(None)  # from here until the commit, whatever happens
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if "weights" in self._released:
            raise RuntimeError(f"{self.url}: weights are released; resume_memory(['weights']) "
                               "before update_weights")
        with self._sync_lock:
            it = iter(requests)
            cur = next(it, None)
            if cur is None:
                raise ValueError("update_weights got no tensors")
            self.pause_generation()
            self.flush_cache()
            while cur is not None:
                nxt = next(it, None)
                payloads, keep = cur
                body = {"serialized_named_tensors": payloads, "load_format": "flattened_bucket",
                        "flush_cache": nxt is None}
                if nxt is None:
                    body["weight_version"] = str(version)
                self._checked("/update_weights_from_tensor", body)
                cuda = isinstance(keep, FlatBucket) and keep.tensor.is_cuda
                cur = payloads = keep = None  # drop this request's buffer before the next
                if cuda:
                    torch.cuda.ipc_collect()  # return blocks the server has closed
                cur = nxt
            self._commit(version, resume=True)

    def _commit(self, version: int, resume: bool = False) -> None:
        reported = self.get_server_weight_version()
        if reported is not None and reported != str(version):
            raise RuntimeError(f"{self.url}: server reports weight version {reported!r} after "
                               f"syncing version {version}")
        if resume:
            self.continue_generation()
        self._set_version(version)

    def _generate_body(self, prompt: Prompt, index: int, n: int, sp: SamplingParams) -> dict:
        params: dict[str, Any] = {
            "max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature,
            "top_p": sp.top_p, "top_k": sp.top_k if sp.top_k > 0 else -1,
            "skip_special_tokens": True, "no_stop_trim": True}  # stop strings stay in the text
        if sp.stop:
            params["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in sp.stop_token_ids]
        if prompt.input_ids:
            key, value = "input_ids", [int(t) for t in prompt.input_ids]
        elif prompt.text is not None:
            key, value = "text", prompt.text
        else:
            raise ValueError(f"prompt {index} has neither input_ids nor text")
        images = [_image_item(im) for im in prompt.images] or None
        body: dict[str, Any] = {"return_logprob": True}
        if sp.seed is None or n == 1:
            if n > 1:
                params["n"] = n
            elif sp.seed is not None:
                params["sampling_seed"] = sp.seed + index
            body.update({key: value, "sampling_params": params})
            if images:
                body["image_data"] = images
        else:  # a batch of n copies, each with its own seed (one seed would repeat one sample)
            body.update({key: [value] * n, "sampling_params": [
                dict(params, sampling_seed=sp.seed + index * n + j) for j in range(n)]})
            if images:
                body["image_data"] = [images] * n
        return body

    def _parse_output(self, out: dict, prompt_index: int, version: int) -> Sample:
        meta = out.get("meta_info") or {}
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind == "abort":  # e.g. pause_generation of a weight sync
            err = StaleWeightsError if self._version != version else RuntimeError
            raise err(f"{self.url}: request aborted: {reason.get('message')}")
        if kind not in ("stop", "length"):
            raise RuntimeError(f"{self.url}: unexpected finish_reason {reason!r}")
        served = meta.get("weight_version")
        if served is not None and str(served) != str(version):
            raise StaleWeightsError(f"{self.url}: server generated with weight version "
                                    f"{served!r}, engine expects {version}")
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise RuntimeError(f"{self.url}: answer has no meta_info.output_token_logprobs")
        # entries are (logprob, token_id, text|None): the token ids paired with the logprobs
        return Sample(prompt_index, [int(e[1]) for e in entries], out.get("text") or "",
                      [float(e[0]) for e in entries], kind, version)

    def _start(self) -> None:
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="sglang-", suffix=".log")
            os.close(fd)
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.launch_command, stdout=log,
                                             stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)  # own group: kill it whole
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._kill()
                raise EngineDeadError(f"SGLang server {self.url} exited with code {code} before "
                                      f"it was healthy; {self._log_tail()}")
            try:
                self._get("/health_generate", timeout=self.health_timeout)
                return
            except (EngineDeadError, SGLangHTTPError):
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise EngineDeadError(f"SGLang server {self.url} was not healthy within "
                                      f"{self.startup_timeout:.0f}s; {self._log_tail()}")
            time.sleep(0.25)

    def _log_tail(self, nbytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                tail = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"log {self.log_path} unreadable ({e})"
        return f"command {' '.join(self.launch_command or [])!r}, log {self.log_path} ends:\n{tail}"

    def _kill(self) -> None:
        p, self._process = self._process, None
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)
        try:  # children (scheduler, detokenizer) that outlived the leader
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _checked(self, path: str, body: dict) -> Any:
        out = self._post(path, body, timeout=self.control_timeout)
        if isinstance(out, dict) and out.get("success") is False:
            raise RuntimeError(f"{self.url}{path} failed: {str(out.get('message'))[:500]}")
        return out

    def _get(self, path: str, *, timeout: float) -> Any:
        return self._request("GET", path, None, timeout)

    def _post(self, path: str, body: dict, *, timeout: float) -> Any:
        return self._request("POST", path, body, timeout)

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> Any:
        url = self.url + path
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")
            except (OSError, HTTPException):
                text = ""
            raise SGLangHTTPError(method, url, e.code, text) from None
        except (OSError, HTTPException) as e:  # refused, reset, timed out, closed mid-answer
            reason = getattr(e, "reason", None) or e
            raise EngineDeadError(f"SGLang server at {self.url} did not answer {method} {path}: "
                                  f"{type(e).__name__}: {reason}") from e
        text = raw.decode("utf-8", "replace")
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return text
