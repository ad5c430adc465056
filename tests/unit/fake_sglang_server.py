"""A small stand-in for an SGLang HTTP server (CPU, threads), for the SGLangEngine tests.

It speaks SGLang 0.5.23's routes, weight-update sessions, payloads and response shapes (the
contract itself is checked against SGLang's own code in tests/sglang_api) over a tiny torch "model" -- a dict of named tensors in three dtypes, one 0-d -- whose greedy
tokens and log-probs depend on every tensor, so a test can tell which weights it serves. It
decodes flattened buckets (SGLang's metadata class read as ours), tracks the weight version and the
pause / memory state, records every call, and can fail (HTTP 400) or die mid-sync on request.
With `join_groups=True` it really joins the weight-update groups it is asked to (one gloo member,
built the way SGLang's `init_custom_process_group` builds it) and receives each
/update_weights_from_distributed as one broadcast of the flat bytes, laid out as SGLang's
`FlattenedTensorBucket.empty` lays them out; otherwise it only records the group names.
Run as a process: `python -m tests.unit.fake_sglang_server --port P` (see `main`).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import pickle
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from eureka_megatron.rollout.buckets import FlatTensorMeta, unflatten_bucket
from eureka_megatron.rollout.sglang.payload import SGLANG_METADATA

VOCAB, HIDDEN, EOS = 16, 4, 15
ALPHABET = "abcdefghijklmno"  # token t -> ALPHABET[t]; EOS is special (skipped in text)


class _PayloadUnpickler(pickle.Unpickler):
    """What SGLang's SafeUnpickler does for a CPU payload, minus SGLang: its metadata class is
    read as ours, and the only other globals are torch's tensor rebuilds."""

    def find_class(self, module, name):
        if (module, name) == SGLANG_METADATA:
            return FlatTensorMeta
        if module.split(".")[0] not in ("torch", "builtins", "collections", "copyreg"):
            raise pickle.UnpicklingError(f"blocked global {module}.{name}")
        return super().find_class(module, name)


def deserialize_payload(data: str) -> dict:
    """One `serialized_named_tensors` entry back to its flattened-bucket dict."""
    return _PayloadUnpickler(io.BytesIO(base64.b64decode(data, validate=True))).load()


def initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.rand(HIDDEN, generator=g) + 0.5,
        "model.scale": torch.tensor(2.0),
        "model.bias_token": torch.tensor([3], dtype=torch.int64),
    }


def tensor_digest(t: torch.Tensor) -> str:
    """Bit-exact identity of a tensor (dtype, shape and bytes)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


def decode(tokens: list[int]) -> str:
    return "".join(ALPHABET[t] for t in tokens if t != EOS)


def fake_generate(weights: dict[str, torch.Tensor], input_ids: list[int], params: dict) -> dict:
    """One sample: greedy unless a seed and temperature > 0 are given; SGLang's output dict."""
    temperature = float(params.get("temperature", 1.0))
    stop_ids = set(params.get("stop_token_ids") or []) | {EOS}
    stops = params.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    seed = params.get("sampling_seed")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"].float()
    ids, out, lps, reason = list(input_ids), [], [], None
    for _ in range(int(params.get("max_new_tokens", 128))):
        h = embed[ids[-1] % VOCAB] * weights["model.norm.weight"] * weights["model.scale"]
        logits = head @ h + 0.05 * len(ids)
        logits[int(weights["model.bias_token"][0]) % VOCAB] += 0.5
        scaled = logits / temperature if temperature > 0 else logits
        logp = torch.log_softmax(scaled, -1)
        if gen is not None and temperature > 0:
            tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
        else:
            tok = int(torch.argmax(logits))
        ids.append(tok)
        out.append(tok)
        lps.append(float(logp[tok]))
        if tok in stop_ids:
            reason = {"type": "stop", "matched": tok}
            break
        hit = next((s for s in stops if decode(out).endswith(s)), None)
        if hit is not None:
            reason = {"type": "stop", "matched": hit}
            break
    if reason is None:
        reason = {"type": "length", "length": len(out)}
    return {"text": decode(out), "output_ids": out, "meta_info": {
        "finish_reason": reason, "prompt_tokens": len(input_ids), "completion_tokens": len(out),
        "cached_tokens": 0, "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, out)]}}


class FakeSGLangServer:
    """Threaded fake; `start()` serves in a background thread, `url` is where."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, weight_version: str = "0",
                 tp_size: int = 1, seed: int = 0, exit_on_death: bool = False,
                 join_groups: bool = False):
        self.weights = initial_weights(seed)
        self.weight_version = weight_version
        self.tp_size = tp_size
        self.exit_on_death = exit_on_death  # a process dies for real
        self.calls: list[tuple[str, str, dict]] = []
        self.generate_bodies: list[dict] = []
        self.paused = False
        self.released: set[str] = set()
        self.groups: set[str] = set()
        self.join_groups = join_groups
        self.process_groups: dict[str, object] = {}  # joined for real (join_groups)
        self.received: list[list[str]] = []  # names of each distributed update received
        self.session_open = False
        self.deterministic = False
        self.text_prompt_tokens: int | None = None  # meta_info.prompt_tokens of text prompts
        self.fail_at_bucket: int | None = None  # answer this tensor update (0-based) with 400
        self.die_at_bucket: int | None = None   # die on this tensor update
        self.buckets_seen = 0
        self.rank_payloads: list[int] = []       # len(serialized_named_tensors) per update
        self.lock = threading.RLock()
        self.resumed = threading.Condition(self.lock)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeSGLangServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for name in list(self.process_groups):
            self._leave(name)

    def die(self) -> None:
        if self.exit_on_death:
            os._exit(1)
        threading.Thread(target=self.stop, daemon=True).start()

    def call_paths(self) -> list[str]:
        return [path for _, path, _ in self.calls]

    # --- endpoints: (status, json-able body or str) ------------------------------------------

    def route(self, method: str, path: str, body: dict):
        summary = {k: v for k, v in body.items() if k != "serialized_named_tensors"}
        if "serialized_named_tensors" in body:
            summary["n_serialized"] = len(body["serialized_named_tensors"])
        with self.lock:
            self.calls.append((method, path, summary))
        handler = getattr(self, "ep_" + path.strip("/").replace("/", "_"), None)
        if handler is None:
            return 404, {"detail": "Not Found"}
        return handler(body)

    def ep_health(self, body):
        return 200, ""

    def ep_health_generate(self, body):
        return (503, "") if self.paused or self.released else (200, "")

    def ep_model_info(self, body):
        return 200, {"model_path": "fake", "is_generation": True, "model_type": "fake",
                     "weight_version": self.weight_version}

    def ep_server_info(self, body):
        return 200, {"tp_size": self.tp_size, "version": "fake",
                     "enable_deterministic_inference": self.deterministic}

    def ep_begin_weight_update(self, body):
        with self.lock:
            if self.session_open:
                return 400, {"success": False, "message": "a weight-update session is already "
                             "open; call end_weight_update() first"}
            self.session_open = True
        return 200, {"success": True, "message": "Success"}

    def ep_end_weight_update(self, body):
        with self.lock:
            if not self.session_open:
                return 400, {"success": False, "message": "no weight-update session is open; "
                             "call begin_weight_update() first"}
            self.session_open = False
        return 200, {"success": True, "message": "Success"}

    def _outside_session(self, path):
        if self.session_open:
            return None
        return 400, {"success": False, "message": f"{path} must run between "
                     "begin_weight_update() and end_weight_update()"}

    def ep_flush_cache(self, body):
        return 200, "Cache flushed.\n"

    def ep_pause_generation(self, body):
        with self.lock:
            self.paused = True
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def ep_continue_generation(self, body):
        with self.lock:
            self.paused = False
            self.resumed.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def ep_release_memory_occupation(self, body):
        with self.lock:
            self.released |= set(body.get("tags") or ("weights", "kv_cache", "cuda_graph"))
        return 200, None

    def ep_resume_memory_occupation(self, body):
        with self.lock:
            tags = body.get("tags")
            self.released = self.released - set(tags) if tags else set()
        return 200, None

    def ep_update_weight_version(self, body):
        self.weight_version = body["new_version"]
        return 200, {"success": True, "new_version": body["new_version"]}

    def ep_init_weights_update_group(self, body):
        name = body["group_name"]
        if self.join_groups:
            if body["rank_offset"] + self.tp_size != body["world_size"]:
                return 400, {"success": False, "message": "a fake joins as the group's last rank"}
            wait = timedelta(seconds=60)
            store, rank, world = next(c10d.rendezvous(
                f"tcp://{body['master_address']}:{body['master_port']}", body["rank_offset"],
                body["world_size"], timeout=wait))
            store.set_timeout(wait)
            group, _ = c10d._new_process_group_helper(
                world, rank, [], c10d.Backend(body["backend"]), c10d.PrefixStore(name, store),
                group_name=name, timeout=wait)
            c10d._world.pg_group_ranks[group] = {i: i for i in range(world)}
            self.process_groups[name] = group
        self.groups.add(name)
        return 200, {"success": True, "message": "Succeeded to initialize group."}

    def ep_destroy_weights_update_group(self, body):
        self._leave(body["group_name"])
        return 200, {"success": True, "message": "Succeeded to destroy group."}

    def _leave(self, name):
        self.groups.discard(name)
        group = self.process_groups.pop(name, None)
        if group is not None:
            dist.destroy_process_group(group)

    def ep_update_weights_from_distributed(self, body):
        with self.lock:
            k = self.buckets_seen
            self.buckets_seen += 1
        if self.join_groups and k == self.die_at_bucket:
            for name in list(self.process_groups):
                self._leave(name)
            self.die()
            return None, None
        refused = self._outside_session("update_weights_from_distributed")
        if refused:
            return refused
        if body["group_name"] not in self.groups:
            return 400, {"success": False, "message": f"group {body['group_name']} not found"}
        if k == self.fail_at_bucket:
            return 400, {"success": False, "message": "Failed to update weights: injected"}
        if self.join_groups:
            if body.get("load_format") != "flattened_bucket":
                return 400, {"success": False, "message": f"load_format {body.get('load_format')}"}
            try:
                named = self._receive(body)
            except RuntimeError as e:
                return 400, {"success": False, "message": f"Failed to receive weights: {e}"}
            with self.lock:
                self.received.append([n for n, _ in named])
                for name, t in named:
                    error = self.load_tensor(name, t)
                    if error:
                        return 400, {"success": False, "message": error}
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _receive(self, body) -> list[tuple[str, torch.Tensor]]:
        """One broadcast of the bucket's bytes, each tensor's right after the previous one's."""
        spans, offset = [], 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            dtype = getattr(torch, dtype)
            size = torch.Size(shape).numel() * dtype.itemsize
            spans.append((name, dtype, shape, offset, offset + size))
            offset += size
        flat = torch.empty(offset, dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=self.process_groups[body["group_name"]])
        return [(name, flat[a:b].view(dtype).view(shape).clone())
                for name, dtype, shape, a, b in spans]

    def load_tensor(self, name: str, t: torch.Tensor) -> str | None:
        """Take a synced tensor into the served weights; the refusal message, if any."""
        old = self.weights.get(name)
        if old is None or old.shape != t.shape or old.dtype != t.dtype:
            return f"cannot load {name} {t.dtype} {tuple(t.shape)}"
        self.weights[name] = t.clone()
        return None

    def ep_update_weights_from_tensor(self, body):
        with self.lock:
            k = self.buckets_seen
            self.buckets_seen += 1
            if k == self.die_at_bucket:
                self.die()
                return None, None  # close the connection without an answer
            refused = self._outside_session("update_weights_from_tensor")
            if refused:
                return refused
            if k == self.fail_at_bucket:
                return 400, {"success": False, "message": "Failed to update weights: injected"}
            if "weights" in self.released:
                return 400, {"success": False, "message": "weights are released"}
            if body.get("load_format") != "flattened_bucket":
                return 400, {"success": False, "message": f"load_format {body.get('load_format')}"}
            entries = body["serialized_named_tensors"]
            self.rank_payloads.append(len(entries))
            per_rank = [unflatten_bucket(deserialize_payload(e)) for e in entries]
            for other in per_rank[1:]:  # a replicated bucket: every rank gets the same tensors
                assert [n for n, _ in other] == [n for n, _ in per_rank[0]]
            for name, t in per_rank[0]:
                error = self.load_tensor(name, t)
                if error:
                    return 400, {"success": False, "message": error}
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Success"}

    def ep_generate(self, body):
        with self.lock:
            self.generate_bodies.append(body)
            if not self.resumed.wait_for(lambda: not self.paused, timeout=30):
                return 503, {"error": "paused"}
            if self.released:
                return 500, {"error": "memory released"}
            weights, version = dict(self.weights), self.weight_version
        key = "input_ids" if body.get("input_ids") is not None else "text"
        prompts, params = body[key], body.get("sampling_params") or {}
        batch = isinstance(prompts, list) and (key == "text" or isinstance(prompts[0], list))
        prompts = prompts if batch else [prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            ids = prompt if key == "input_ids" else [ord(c) % VOCAB for c in prompt]
            for j in range(int(sp.get("n", 1))):
                out = fake_generate(weights, ids, sp)
                out["meta_info"].update(id=f"req-{i}-{j}", weight_version=version)
                if key == "text":  # SGLang would count its own image expansion
                    out["meta_info"]["prompt_tokens"] = self.text_prompt_tokens
                outs.append(out)
        return 200, (outs if batch or len(outs) > 1 else outs[0])

    def ep_fake_state(self, body):
        return 200, {"weights": {n: tensor_digest(t) for n, t in self.weights.items()},
                     "calls": self.call_paths(), "weight_version": self.weight_version,
                     "paused": self.paused, "pid": os.getpid()}


def _handler(server: FakeSGLangServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else {}
            status, out = server.route(method, self.path.split("?")[0], body)
            if status is None:
                self.close_connection = True
                return
            data = (out if isinstance(out, str) else json.dumps(out)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(out, str)
                             else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    return Handler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--weight-version", default="0")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--fail-on-start", default=None, help="print this and exit 3 before serving")
    p.add_argument("--die-at-bucket", type=int, default=None)
    p.add_argument("--join-groups", action="store_true", help="join weight-update groups for real")
    args = p.parse_args(argv)
    print(f"fake sglang server starting on {args.host}:{args.port}", flush=True)
    if args.fail_on_start:
        print(args.fail_on_start, flush=True)
        sys.exit(3)
    time.sleep(args.startup_delay)
    server = FakeSGLangServer(args.host, args.port, weight_version=args.weight_version,
                              tp_size=args.tp_size, exit_on_death=True,
                              join_groups=args.join_groups)
    server.die_at_bucket = args.die_at_bucket
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
