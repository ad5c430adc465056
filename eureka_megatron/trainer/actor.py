"""The Megatron actor: the policy (trainable, any TP/PP/DP) and a frozen reference, built from an
HF checkpoint; log-probs through the fused kernel, RL and supervised train steps, weight export to
rollout engines, checkpoints. Every method is collective over all ranks.

The reference model is the policy's starting weights, kept only when a KL term needs it, and on a
GPU it lives in host memory between uses (`offload_reference`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from eureka_megatron.convert.families import family_for
from eureka_megatron.rl_config import RLConfig


class Actor:
    def __init__(self, cfg: RLConfig, need_reference: bool):
        from eureka_megatron.convert.hf_io import HFCheckpoint
        from eureka_megatron.models.init import fill_global_tensors
        from eureka_megatron.trainer.train_step import wrap_for_training

        self.cfg = cfg
        hf_dir = Path(cfg.model.hf)
        self.hf_config = json.loads((hf_dir / "config.json").read_text())
        self.family = family_for(self.hf_config, str(hf_dir / "config.json"))
        mcfg = self.family.config_from_hf(self.hf_config, hf_dir)
        if hasattr(mcfg, "freeze_vision"):
            mcfg.freeze_vision = cfg.model.freeze_vision
        if hasattr(mcfg, "freeze_projector"):
            mcfg.freeze_projector = cfg.model.freeze_projector
        self.model_cfg = mcfg
        self.text_cfg = getattr(mcfg, "text", mcfg)
        ckpt = HFCheckpoint(hf_dir)
        layout = self.family.detect_layout(ckpt.names)
        tensors = self.family.mapping(mcfg, layout).to_megatron(ckpt.get)

        def source(key, layer, shape):
            return tensors[(key, layer)]

        chunks = self.family.build_chunks(mcfg, cfg.parallel)
        fill_global_tensors(chunks, source)
        if cfg.parallel.pipeline_parallel > 1:  # micro-batches differ in rows and length
            chunks[0].config.variable_seq_lengths = True
        t = cfg.train
        opt_steps = t.steps * t.mini_batches * t.epochs
        wcfg = dataclasses.replace(cfg, optim=dataclasses.replace(
            cfg.optim, decay_steps=cfg.optim.decay_steps or opt_steps))
        self.model = wrap_for_training(chunks, wcfg)
        self.reference = None
        if need_reference:
            ref = self.family.build_chunks(mcfg, cfg.parallel)
            fill_global_tensors(ref, source)
            for c in ref:
                c.eval().requires_grad_(False)
            self.reference = ref
            self._offload(ref)
        del tensors

    # --- forward passes ----------------------------------------------------------------------

    def call(self, chunk, mb):
        return self.family.call(self.model_cfg, chunk, mb)

    def prepare(self, inputs: dict) -> dict:
        return self.family.prepare(self.model_cfg, inputs)

    def micro_batches(self, seqs, pad_id: int) -> list[dict]:
        """Token-budget micro-batches; rows of one prompt share one vision-tower pass."""
        from eureka_megatron.trainer.batches import micro_batches

        return micro_batches(seqs, self.cfg.train.micro_batch_tokens, pad_id, self.prepare,
                             getattr(self.model_cfg, "image_token_id", None))

    def logprobs(self, micro_batches: list[dict], reference: bool = False) -> list[torch.Tensor]:
        """[B, S] log-probs of each micro-batch's labels under the policy (or the reference)."""
        from eureka_megatron.models.forward import forward_token_logprobs

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

    def train(self, micro_batches: list[dict], forward_fn) -> dict[str, float]:
        from eureka_megatron.trainer.train_step import train_step

        for c in self.model.chunks:
            c.train()
        return train_step(self.model, micro_batches, forward_fn)

    def policy_forward(self):
        from eureka_megatron.trainer.policy_forward import policy_forward

        return policy_forward(self.cfg.algo, self.text_cfg.vocab_size,
                              temperature=self.cfg.rollout.temperature,
                              sum_norm_length=self.cfg.rollout.max_new_tokens, call=self.call)

    def supervised_forward(self):
        """Next-token NLL of the labelled tokens through the fused kernel (stage-0 warm-up)."""
        from eureka_megatron.models.logprobs import (final_hidden_states, is_last_stage_chunk,
                                                     token_logprobs, unwrap)

        vocab = self.text_cfg.vocab_size

        def forward(chunk, mb):
            model = unwrap(chunk)
            if not is_last_stage_chunk(model):
                return self.call(chunk, mb), None
            with final_hidden_states(model):
                hidden = self.call(chunk, mb)

            def loss_fn(h):
                lp, _ = token_logprobs(model, h, mb["labels"], vocab, 1.0, None)
                mask = mb["loss_mask"]
                loss = -(lp * mask).sum()
                count = mask.sum().to(torch.int)
                return loss, count, {"loss_sum": loss.detach().double(),
                                     "count": count.detach().double()}

            return hidden, loss_fn

        return forward

    # --- weights out ---------------------------------------------------------------------------

    def sync_to(self, engine, version: int):
        """Collective: stream the policy's weights into `engine` (rank 0's; None elsewhere)."""
        from eureka_megatron.rollout.weight_sync import sync_with_restart
        from eureka_megatron.runtime.distributed import broadcast_object

        layout = broadcast_object(engine.weight_layout if engine is not None else None)
        mapping = self.family.mapping(self.model_cfg, layout)
        return sync_with_restart(self.model.unwrapped, mapping, engine, version,
                                 bucket_bytes=self.cfg.rollout.sync_bucket_mb << 20)

    def export_hf(self, out_dir: Path, src_dir: Path) -> None:
        """Collective: write the policy as an HF checkpoint (the layout of the source checkpoint,
        side files copied), atomically."""
        import shutil

        from eureka_megatron.convert.hf_io import HFCheckpoint, ShardedSafetensorsWriter, copy_side_files
        from eureka_megatron.rollout.weight_export import export_hf_weights

        layout = self.family.detect_layout(HFCheckpoint(src_dir).names)
        mapping = self.family.mapping(self.model_cfg, layout)
        rank0 = torch.distributed.get_rank() == 0
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        writer = None
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            copy_side_files(src_dir, tmp)
            tensors = {}
        for name, t in export_hf_weights(self.model.unwrapped, mapping, dest="rank0"):
            if rank0:
                tensors[name] = t.detach().clone()
        if rank0:
            plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
            writer = ShardedSafetensorsWriter(tmp, plan)
            for n, t in tensors.items():
                writer.add(n, t)
            writer.finish()
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        torch.distributed.barrier()

    # --- host offload of the reference (GPU only) ----------------------------------------------

    def _offload(self, chunks) -> None:
        if torch.cuda.is_available():
            for c in chunks:
                c.to("cpu")

    def _onload(self, chunks) -> None:
        if torch.cuda.is_available():
            for c in chunks:
                c.to(torch.cuda.current_device())
