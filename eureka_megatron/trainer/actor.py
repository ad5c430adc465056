"""The Megatron actor: the policy (trainable, any TP/PP/DP) and a frozen reference, built from an
HF checkpoint. It owns its megatron state (model, optimizer, scheduler, DP groups) and offers the
loop one verb per stage: `plan` (this DP rank's micro-batches), `logprobs` (old / reference),
`sequence_kl`, `train`, `sync_to` (weights into a rollout engine), `save` / `load` (checkpoints),
`export_hf`. Every method is collective over all ranks.

The reference model is the policy's starting weights, kept only when a KL term needs it, and on a
GPU it lives in host memory between uses (`offload_reference`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from eureka_megatron.algo.reward_shaping import kl_penalized_rewards
from eureka_megatron.config import RLConfig
from eureka_megatron.convert.export import write_hf
from eureka_megatron.convert.hf_io import HFCheckpoint
from eureka_megatron.convert.run import CONVERSION
from eureka_megatron.models.packing import as_rows
from eureka_megatron.models.forward import forward_token_logprobs
from eureka_megatron.models.init import fill_global_tensors
from eureka_megatron.models.llm import building
from eureka_megatron.models.logprobs import (final_hidden_states, is_last_stage_chunk,
                                             token_logprobs, unwrap)
from eureka_megatron.models.registry import family_for
from eureka_megatron.models.routing_replay import replaying
from eureka_megatron.rollout.weight_broadcast import WeightBroadcaster
from eureka_megatron.rollout.weight_sync import sync_with_restart
from eureka_megatron.runtime.distributed import broadcast_object
from eureka_megatron.trainer import checkpoint
from eureka_megatron.trainer.checkpoint import CheckpointError
from eureka_megatron.trainer.batches import Sequence, dp_share, micro_batches, mini_batch_groups
from eureka_megatron.trainer.policy_forward import policy_forward
from eureka_megatron.trainer.train_step import train_step, wrap_for_training

# the first optimizer step's values, reported under first/ (exactly 1 and 0 on-policy)
FIRST_STEP_KEYS = ("ratio_min", "ratio_max", "kl", "seq_ratio_min", "seq_ratio_max")
# the first forward runs the weights the engine sampled with: rollout-vs-trainer agreement
ROLLOUT_AGREEMENT = {"rollout_logprob_abs_diff": "rollout/logprob_abs_diff_mean",
                     "rollout_logprob_abs_diff_max": "rollout/logprob_abs_diff_max",
                     "rollout_k3_kl": "rollout/k3_kl", "rollout_beyond_cap": "rollout/beyond_is_cap"}


@dataclass
class TrainPlan:
    """One step's batch as this DP rank trains it: per mini-batch (whole groups) its micro-batches,
    and for every micro-batch row the index of its sequence in the whole batch."""

    minis: list[tuple[list[dict], list[list[int]]]]
    size: int  # sequences in the whole batch, over all DP ranks
    ref_logprobs: list | None = None  # per micro-batch, once `Actor.logprobs` ran with a reference

    @property
    def micro_batches(self) -> list[dict]:
        return [mb for mbs, _ in self.minis for mb in mbs]


class Actor:
    def __init__(self, cfg: RLConfig, need_reference: bool, hf_dir: Path | None = None,
                 megatron_dir: str | Path | None = None):
        """Weights from `megatron_dir` (a torch_dist checkpoint: each rank reads its own shards)
        or else from the HF checkpoint `hf_dir`, streamed one tensor at a time; `hf_dir` also
        gives the config and tokenizer. Default: the configured model (`model.megatron` /
        `model.hf`); the stage-0 output after a format warm-up."""
        self.cfg = cfg
        if hf_dir is None:
            hf_dir, megatron_dir = cfg.model.hf_dir, cfg.model.megatron
        self.hf_dir = hf_dir = Path(hf_dir)
        self.hf_config = json.loads((hf_dir / "config.json").read_text())
        self.family = family_for(self.hf_config, str(hf_dir / "config.json"))
        mcfg = self.family.trainable(self.family.config_from_hf(self.hf_config, hf_dir), cfg.model)
        self.model_cfg = mcfg
        self.text_cfg = getattr(mcfg, "text", mcfg)
        if megatron_dir is not None:
            self.hf_layout = source_layout(Path(megatron_dir), hf_dir)

            def load(chunks):
                checkpoint.load_weights(chunks, megatron_dir)
        else:
            ckpt = HFCheckpoint(hf_dir)
            self.hf_layout = self.family.detect_layout(ckpt.names)
            # one global tensor at a time, straight from the files: never the model in memory
            source = self.family.mapping(mcfg, self.hf_layout).source(ckpt.get, ckpt.expert)

            def load(chunks):
                fill_global_tensors(chunks, source)

        with building(initialize=False, recompute=cfg.train.recompute):
            chunks = self.family.build_chunks(mcfg, cfg.parallel)
        load(chunks)
        self._vary_shapes(chunks)
        t = cfg.train
        self.model = wrap_for_training(chunks, cfg.optim, bf16=cfg.parallel.bf16,
                                       decay_steps=t.steps * t.mini_batches * t.epochs)
        self.checkpoints = checkpoint.CheckpointWriter(cfg.checkpoint.async_save)
        self.broadcaster = WeightBroadcaster()  # engines on GPUs of their own: groups kept
        self.reference = None
        if need_reference:
            with building(initialize=False):
                ref = self.family.build_chunks(mcfg, cfg.parallel)
            load(ref)
            # Only ever run under no_grad, but its weights keep the policy's requires_grad: megatron
            # runs frozen weights through another linear implementation, whose rounding differs
            # at some shapes -- and the first step's KL to the reference must be exactly 0.
            for c in ref:
                c.eval()
            self._vary_shapes(ref)
            self.reference = ref
            self._offload(ref)

    # --- the RL step ---------------------------------------------------------------------------

    def plan(self, seqs: list[Sequence], pad_id: int) -> TrainPlan | None:
        """This DP rank's share of the batch, as micro-batches per mini-batch of whole groups;
        None when there are fewer sequences than DP ranks (the step cannot train)."""
        from megatron.core import parallel_state as ps

        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if len(seqs) < dp:
            return None
        k = getattr(self.text_cfg, "num_experts_per_tok", 0)
        for i, s in enumerate(seqs):
            s.index = i
            if s.routed_experts is not None:  # SGLang sends [tokens, layers * k]
                s.routed_experts = s.routed_experts.reshape(len(s) - 1, -1, k)
        minis = []
        for mini in mini_batch_groups(seqs, self.cfg.train.mini_batches):
            share = dp_share(mini, dp_rank, dp)
            if not share:  # more DP ranks than sequences: nothing to train on this rank
                minis.append(([], []))
                continue
            mbs = self.micro_batches(share, pad_id)
            minis.append((mbs, [[share[j].index for j in mb["sequences"]] for mb in mbs]))
        return TrainPlan(minis, len(seqs))

    def logprobs(self, plan: TrainPlan) -> None:
        """Old log-probs (when the batch is trained on more than once -- otherwise the training
        forward's own, detached, are exact -- or the KL goes into the reward) and reference
        log-probs (only with a KL term), computed with the training partition and kept in the
        plan's micro-batches."""
        a = self.cfg.algo
        flat = plan.micro_batches
        kl_in_reward = a.kl_in == "reward" and a.kl_coef > 0
        recompute = self.cfg.train.mini_batches * self.cfg.train.epochs > 1 or kl_in_reward
        old = self.forward_logprobs(flat) if flat and recompute else [None] * len(flat)
        ref = (self.forward_logprobs(flat, reference=True)
               if flat and self.reference is not None else [None] * len(flat))
        plan.ref_logprobs = ref
        for mb, lp, rlp in zip(flat, old, ref):
            mb["old_logprobs"] = lp
            if a.kl_in == "loss" and a.kl_coef > 0:
                mb["ref_logprobs"] = rlp

    def sequence_kl(self, plan: TrainPlan) -> torch.Tensor:
        """[N] summed per-token KL(policy || reference) of every sequence of the batch (all DP
        ranks' shares gathered), from the log-probs `logprobs` kept."""
        from megatron.core import parallel_state as ps

        local = {}
        rows = [idx for _, per_mb in plan.minis for idx in per_mb]
        for mb, idx, ref in zip(plan.micro_batches, rows, plan.ref_logprobs):
            _, kl = kl_penalized_rewards(torch.zeros(len(idx)), mb["old_logprobs"], ref,
                                         mb["loss_mask"], self.cfg.algo.kl_coef,
                                         self.cfg.algo.kl_type)
            local.update(zip(idx, kl.tolist()))
        parts = [None] * ps.get_data_parallel_world_size()
        torch.distributed.all_gather_object(parts, local, group=ps.get_data_parallel_group())
        kl = torch.zeros(plan.size, dtype=torch.float64)
        for part in parts:
            for i, v in part.items():
                kl[i] = v
        return kl

    def train(self, plan: TrainPlan, advantages: torch.Tensor) -> dict[str, float]:
        """epochs x mini-batches optimizer steps on the plan with these [N] advantages; means of
        the metrics (max / min for *_max / *_min) under train/, the first optimizer step's ratio
        and KL under first/, and the rollout-vs-trainer agreement of the first forward."""
        for mbs, rows in plan.minis:
            for mb, idx in zip(mbs, rows):
                mb["advantages"] = advantages[idx].float()
        forward = self.policy_forward()
        runs = []
        for _ in range(self.cfg.train.epochs):
            for mbs, _ in plan.minis:
                if mbs:  # this DP rank's share of the mini-batch is empty (fewer rows than DP)
                    runs.append(self.train_micro_batches(mbs, forward))
        out = {}
        for k in runs[0]:
            vals = [r[k] for r in runs if k in r]
            out[k] = (max(vals) if k.endswith("_max") else min(vals) if k.endswith("_min")
                      else sum(vals) / len(vals))
        first = {f"first/{k}": runs[0][k] for k in FIRST_STEP_KEYS if k in runs[0]}
        agree = {name: runs[0].get(k, 0.0) for k, name in ROLLOUT_AGREEMENT.items()}
        computed = out.pop("computed_tokens")
        real = out.pop("real_tokens", computed)
        public = {k if k.startswith(("lr", "grad_norm")) else f"train/{k}": v
                  for k, v in out.items() if not k.endswith(("_sum", "_tsum"))
                  and not k.startswith("rollout_") and k not in ("count", "tokens", "update_ok")}
        public["train/padding_efficiency"] = real / computed  # real / computed tokens
        return {**public, **first, **agree}

    # --- forward passes ----------------------------------------------------------------------

    def call(self, chunk, mb):
        """Every forward of the policy and the reference; a MoE micro-batch that carries the
        engine's routing is routed by it (routing replay)."""
        with replaying(chunk, mb):
            return self.family.call(self.model_cfg, chunk, mb)

    def prepare(self, inputs: dict) -> dict:
        return self.family.prepare(self.model_cfg, inputs)

    def micro_batches(self, seqs, pad_id: int) -> list[dict]:
        """Token-budget micro-batches, packed unless `train.sequence_packing` is off; rows of one
        prompt share one vision-tower pass; widths divide over TP under sequence parallelism."""
        par, t = self.cfg.parallel, self.cfg.train
        return micro_batches(seqs, t.micro_batch_tokens, pad_id, self.prepare,
                             getattr(self.model_cfg, "image_token_id", None),
                             par.tensor_parallel if par.sequence_parallel else 1,
                             pack=t.sequence_packing)

    def forward_logprobs(self, micro_batches: list[dict], reference: bool = False) -> list[torch.Tensor]:
        """[B, S] log-probs of each micro-batch's labels under the policy (or the reference)."""
        chunks = self.reference if reference else self.model.chunks
        if reference:
            self._onload(chunks)
        for c in chunks:
            c.eval()
        try:
            return forward_token_logprobs(chunks, micro_batches, self.call, self.text_cfg.vocab_size,
                                          temperature=self.cfg.rollout.temperature)
        finally:
            if reference:
                self._offload(chunks)
            else:
                for c in chunks:
                    c.train()

    def train_micro_batches(self, micro_batches: list[dict], forward_fn) -> dict[str, float]:
        """One optimizer step over these micro-batches with any loss (RL or supervised)."""
        for c in self.model.chunks:
            c.train()
        return train_step(self.model, micro_batches, forward_fn)

    def policy_forward(self):
        return policy_forward(self.cfg.algo, self.text_cfg.vocab_size,
                              temperature=self.cfg.rollout.temperature,
                              sum_norm_length=self.cfg.rollout.max_new_tokens, call=self.call)

    def supervised_forward(self):
        """Next-token NLL of the labelled tokens through the fused kernel (stage-0 warm-up)."""
        vocab = self.text_cfg.vocab_size

        def forward(chunk, mb):
            model = unwrap(chunk)
            if not is_last_stage_chunk(model):
                return self.call(chunk, mb), None
            with final_hidden_states(model):
                hidden = self.call(chunk, mb)

            def loss_fn(h):
                lp, _ = token_logprobs(model, h, mb["labels"], vocab, 1.0, None)
                lp = as_rows(lp, mb)
                mask = mb["loss_mask"]
                loss = -(lp * mask).sum()
                count = mask.sum().to(torch.int)
                return loss, count, {"loss_sum": loss.detach().double(),
                                     "count": count.detach().double()}

            return hidden, loss_fn

        return forward

    # --- state ---------------------------------------------------------------------------------

    def save(self, run_dir: Path, step: int, run_state: dict | None, keep_last: int = 0) -> Path:
        """Collective: a resumable checkpoint of model, optimizer, scheduler and RNG after `step`,
        with the run's own state (`run_state`, rank 0's) beside it. With `checkpoint.async_save`
        it is written in the background and published by `self.checkpoints` (`poll` / `finish`)."""
        return self.checkpoints.save(run_dir, step, self.model, run_state, keep_last)

    def load(self, path) -> tuple[int, dict]:
        """Collective: restore a checkpoint saved at any layout; returns (step, run state)."""
        return checkpoint.load_checkpoint(path, self.model)

    # --- weights out ---------------------------------------------------------------------------

    def sync_to(self, engine, version: int):
        """Collective: stream the policy's weights into `engine` (rank 0's; None elsewhere), as
        tensors on rank 0 or, for an engine whose weight transport is "distributed", by
        broadcast from each pipeline stage's sender."""
        layout = broadcast_object(engine.weight_layout if engine is not None else None)
        mapping = self.family.mapping(self.model_cfg, layout)
        self.model.gather_params()
        return sync_with_restart(self.model.unwrapped, mapping, engine, version,
                                 bucket_bytes=self.cfg.rollout.sync_bucket_mb << 20,
                                 broadcaster=self.broadcaster)

    def export_hf(self, out_dir: Path, src_dir: Path | None = None) -> None:
        """Collective: write the policy as an HF checkpoint (in the naming layout it was loaded
        from, with `src_dir`'s side files, default its own), atomically and tensor by tensor."""
        src_dir = Path(src_dir or self.hf_dir)
        self.checkpoints.finish()  # a pending checkpoint is published before the export
        self.model.gather_params()
        write_hf(self.model.unwrapped, self.family.mapping(self.model_cfg, self.hf_layout), out_dir,
                 src_dir)

    def _vary_shapes(self, chunks) -> None:
        """Micro-batches differ in rows and length: megatron's pipeline schedule then sends each
        activation's shape before it (the first micro-batch's shape would not fit the next)."""
        if self.cfg.parallel.pipeline_parallel > 1:
            chunks[0].config.variable_seq_lengths = True

    # --- host offload of the reference (GPU only) ----------------------------------------------

    def _offload(self, chunks) -> None:
        if torch.cuda.is_available():
            for c in chunks:
                c.to("cpu")

    def _onload(self, chunks) -> None:
        if torch.cuda.is_available():
            for c in chunks:
                c.to(torch.cuda.current_device())


def source_layout(megatron_dir: Path, hf_dir: Path) -> str:
    """The HF naming layout a converted checkpoint came from (its conversion.json), else that
    of the HF weights in `hf_dir`: what exports write."""
    step = checkpoint.resolve_checkpoint(megatron_dir)
    for info in (megatron_dir / CONVERSION, step / CONVERSION):
        if info.is_file():
            return json.loads(info.read_text())["layout"]
    if any(hf_dir.glob("*.safetensors")):
        config = json.loads((hf_dir / "config.json").read_text())
        return family_for(config).detect_layout(HFCheckpoint(hf_dir).names)
    raise CheckpointError(f"{megatron_dir} has no {CONVERSION} and {hf_dir} no HF weights: the HF "
                          "naming to export in is unknown (start from `convert hf-to-megatron`'s "
                          "output, or give model.hf a checkpoint with weights)")
