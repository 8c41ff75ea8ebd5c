"""The training loop of ``moekit train`` and the evaluation of ``moekit eval``.

Next-token cross-entropy on bytes plus the MoE layers' auxiliary losses, AdamW, warm-up + cosine schedule,
gradient clipping; ``moekit.end_step(model)`` after every optimiser step (auxiliary-loss-free bias updates).
Bits per byte = cross-entropy in nats / ln 2 over scored targets (bytes and end-of-document).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import balance
from ..data import IGNORE_INDEX, PAD_ID, Corpus, DomainBits, TrainBatches, unigram_baseline, val_batches
from ..layer import aux_loss, end_step, moe_layers
from ..model import MoELM, ModelConfig, param_counts
from .checkpoint import (RUN_FORMAT, RUN_VERSION, latest_checkpoint, latest_step, load_checkpoint,
                         load_model_weights, non_finite_tensors, read_run_config, save_checkpoint)
from ..parallel import ExpertSharding, ParallelLayout, expert_parallel
from .config import TrainConfig

LN2 = math.log(2.0)


class NonFiniteLoss(RuntimeError):
    """Raised when the training loss, or the weights after an update, stop being finite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) during :meth:`Trainer.fit`, after the checkpoint bookkeeping.

    ``kept_step`` is the step of the checkpoint ``latest.json`` now points at (None: the run has none),
    ``saved`` whether that checkpoint was written on the way out, ``step`` the trainer's step.
    """

    def __init__(self, step: int, kept_step: int | None, saved: bool):
        super().__init__()
        self.step, self.kept_step, self.saved = step, kept_step, saved

    def describe(self) -> str:
        if self.kept_step is None:
            return "no checkpoint was saved (the run has none yet)"
        if self.saved:
            return f"checkpoint of step {self.kept_step} saved"
        return f"the last checkpoint (step {self.kept_step}) is kept"


class _DeferredSigint:
    """While active, a first Ctrl-C (SIGINT) only sets ``pending``; the loop raises at the next step boundary,
    where the state is that of a completed step. A second Ctrl-C raises at once. Active only in the main thread
    of a single process whose SIGINT handler is Python's default (under torchrun the ranks could stop at
    different steps and wait on each other forever)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending = False
        self._previous = None

    def __enter__(self):
        if self.enabled and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        print("\nmoekit: Ctrl-C: stopping after this step (press Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def padding_mask(input_ids_BL: torch.Tensor) -> torch.Tensor | None:
    """``[B, L]`` bool, False at ``PAD`` inputs (the padded tail of the last validation window), or None when
    the batch has no padding: passed as the model's ``attention_mask`` so that padding counts in no routing
    loss, load statistic or bias update."""
    real_BL = input_ids_BL != PAD_ID
    return None if bool(real_BL.all()) else real_BL


def routing_is_causal(model: torch.nn.Module) -> bool:
    return all(getattr(layer.gate, "causal", True) for layer in moe_layers(model))


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, seq_len: int, batch_size: int,
             max_windows: int | None = None, progress: bool = False, layout: ParallelLayout | None = None) -> dict:
    """Validation loss (nats), bits per byte, perplexity, overall and per domain.

    Under ``layout`` (more than one rank) every rank scores its share of each batch's rows and the sums are
    all-reduced; a rank left without rows runs the batch's first row unscored, since every rank must take
    part in the experts' all-to-all.
    """
    world = layout.world_size if layout is not None else 1
    was_training = model.training
    model.eval()
    bits = DomainBits(corpus.domains)
    batches = val_batches(corpus, batch_size, seq_len, max_windows)
    iterator = batches
    if progress:
        from tqdm import tqdm

        total = None
        if max_windows is not None:
            total = math.ceil(max_windows / batch_size)
        iterator = tqdm(batches, desc="eval", total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
    for vb in iterator:
        input_ids, targets, domain_ids = vb.input_ids, vb.targets, vb.domain_ids
        if world > 1:
            rows = torch.tensor_split(torch.arange(input_ids.shape[0]), world)[layout.rank]
            scored = len(rows) > 0
            rows = rows if scored else torch.zeros(1, dtype=torch.int64)
            input_ids, targets, domain_ids = input_ids[rows], targets[rows], domain_ids[rows]
            if not scored:
                domain_ids = torch.full_like(domain_ids, -1)
        device = _model_device(model)
        input_ids = input_ids.to(device)
        logits_BLV = model(input_ids, attention_mask=padding_mask(input_ids))
        nats_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), targets.to(device), ignore_index=IGNORE_INDEX,
                                  reduction="none")
        bits.add(nats_BL.cpu(), domain_ids)
    if world > 1:
        bits.all_reduce(layout.data_group)
    model.train(was_training)
    bpb = bits.bits_per_byte()
    per_domain = bits.per_domain()
    counts = {name: int(bits.count_O[i]) for i, name in enumerate(corpus.domains)}
    return {
        "loss": bpb * LN2,
        "bits_per_byte": bpb,
        "perplexity": math.exp(bpb * LN2) if math.isfinite(bpb) else float("nan"),
        "tokens": bits.num_tokens,
        "domains": {name: {"bits_per_byte": v, "tokens": counts[name]} for name, v in per_domain.items()},
    }


def _layer_stats(model, layout: ParallelLayout | None = None) -> tuple[list[float], list[list[int]]]:
    """MaxVio and routed load of every MoE layer's last call (summed over the ranks of ``layout``)."""
    counts = [layer.load.routed_E for layer in moe_layers(model) if layer.load is not None]
    if counts and layout is not None and layout.world_size > 1:
        import torch.distributed as dist

        flat = torch.cat(counts).to(torch.int64)  # one all-reduce; layers may differ in expert count
        dist.all_reduce(flat, group=layout.data_group)
        counts = list(flat.split([c.numel() for c in counts]))
    return [balance.max_violation(c) for c in counts], [c.tolist() for c in counts]


def new_run_config(model_cfg: ModelConfig, train_cfg: TrainConfig, data: str | None,
                   plugins: list[str] | None = None) -> dict:
    """The ``config.json`` of a new run; ``plugins`` lists the plugin files (absolute paths) its routers need."""
    cfg = {"format": RUN_FORMAT, "version": RUN_VERSION, "model": model_cfg.to_dict(),
           "train": asdict(train_cfg), "data": {"path": data}}
    if plugins:
        cfg["plugins"] = [str(Path(p).resolve()) for p in plugins]
    return cfg


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def build_model(model_cfg: ModelConfig, train_cfg: TrainConfig) -> MoELM:
    """The run's model, initialised on the CPU from ``train_cfg.seed`` (the same weights on any device), then
    moved to ``train_cfg.device`` in ``train_cfg.dtype``."""
    torch.manual_seed(train_cfg.seed)
    return MoELM(model_cfg).to(device=train_cfg.device, dtype=_dtype(train_cfg.dtype))


def load_run(run_dir: Path) -> tuple[MoELM, dict]:
    """The model of a run folder with its latest weights, in eval mode, and the run config.

    The plugin files the run records are loaded first; ``ValueError`` when the weights hold NaN or infinite
    values (a diverged run), instead of a model that evaluates to NaN.
    """
    cfg = read_run_config(run_dir)
    from .config import check_run_config

    model_cfg, train_cfg = check_run_config(cfg, str(Path(run_dir) / "config.json"))
    model = MoELM(model_cfg).to(_dtype(train_cfg.dtype))
    load_model_weights(model, Path(run_dir) / "model.safetensors")
    tensors = model.state_dict()
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"{Path(run_dir) / 'model.safetensors'}: {len(bad)} of {len(tensors)} tensors hold NaN or "
                         f"infinite values (e.g. {bad[0]}); the run diverged, so it cannot be evaluated")
    model.eval()
    return model, cfg


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric records past ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step:
            kept.append(line)
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode("utf-8"))


class Trainer:
    """Owns one run folder: model, optimiser, data, metrics, checkpoints."""

    def __init__(self, run_dir: Path, run_config: dict, corpus: Corpus, log=print, progress: bool = True,
                 layout: ParallelLayout | None = None):
        self.run_dir = Path(run_dir)
        self.layout = layout if layout is not None else ParallelLayout.single()
        if self.layout.world_size > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                raise ValueError(f"the trainer runs on the CPU and needs the gloo backend, got {dist.get_backend()}")
        self.run_config = run_config
        self.model_cfg = ModelConfig.from_dict(run_config["model"])
        self.cfg = TrainConfig.from_dict(run_config["train"])
        self.corpus = corpus
        self.log = log
        self.progress = progress
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.cfg.check_device()
        self.model = build_model(self.model_cfg, self.cfg).train()
        # Fine-tuning (moekit finetune, run_config["finetune"]): trainable-parameter filter and regulariser
        # (RoMA) set up by moekit.adapt.finetune before the optimiser is made; extra_loss(model, ids, targets)
        # is added to the router losses, its .metrics() go into each step's record.
        self.extra_loss = None
        if run_config.get("finetune"):
            from ..adapt.finetune import setup_trainer

            setup_trainer(self, run_config["finetune"])
        self.description = describe(self.model, self.model_cfg)
        self.sharding: ExpertSharding | None = None
        self.chunks = self.cfg.overlap_chunks or 1
        self.cost_model = None  # the fitted overlap cost model when overlap_chunks = 0
        if self.layout.world_size > 1:
            self.sharding = expert_parallel(self.model, self.layout, self.chunks)
            layers = moe_layers(self.model)
            if self.cfg.overlap_chunks == 0 and self.layout.ep_size > 1 and layers:
                from ..parallel.cost_model import choose_chunks

                rows = self.cfg.batch_size // self.layout.world_size * self.cfg.seq_len * layers[0].config.top_k
                self.chunks, self.cost_model = choose_chunks(self.layout, layers[0].experts, rows)
            self.chunks = self.sharding.set_chunks(self.chunks)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.batches = TrainBatches(corpus.train, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed)
        self.step = 0
        self.elapsed = 0.0
        self._boundary = True  # see fit(): the state is that of a checkpoint of self.step
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        layers = moe_layers(self.model)
        return {"batches": self.batches.state_dict(), "elapsed": self.elapsed,
                "balancing": [layer.gate.balancing_state() for layer in layers]}

    def save(self) -> Path | None:
        """Write a checkpoint in the single-process layout (expert shards gathered first; rank 0 writes)."""
        if self.sharding is None:
            return save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.optimizer.state_dict(),
                                   self.state(), keep=self.cfg.keep_checkpoints)
        import torch.distributed as dist

        tensors = self.sharding.full_state_dict()
        opt_state = self.sharding.full_optimizer_state(self.optimizer)
        path, error = None, None
        if self.layout.is_main:
            try:
                path = save_checkpoint(self.run_dir, self.step, tensors, opt_state, self.state(),
                                       keep=self.cfg.keep_checkpoints)
            except OSError as exc:
                error = exc
        failed = torch.tensor([0.0 if error is None else 1.0])
        dist.all_reduce(failed, group=self.layout.data_group)  # every rank learns whether rank 0 could write
        if float(failed):
            raise ValueError(f"could not write the checkpoint of step {self.step} in {self.run_dir}"
                             + (f" ({error})" if error is not None else " (see rank 0)"))
        return path

    def resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise ValueError(f"{self.run_dir} has no checkpoint to resume from")
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.sharding)
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.batches.load_state_dict(state["batches"])
        for layer, st in zip(moe_layers(self.model), state.get("balancing", [])):
            layer.gate.load_balancing_state(st)
        if self.layout.is_main:
            _truncate_metrics(self.metrics_path, self.step)

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """One optimiser step; from its first change of state until :meth:`fit` has logged it, the trainer's state
        is no checkpoint's (``_boundary`` False)."""
        self._boundary = False
        cfg = self.cfg
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ce, aux, ce_value, aux_value = self._losses(*next(self.batches))
        if not math.isfinite(ce_value + aux_value):
            raise NonFiniteLoss(f"loss became non-finite ({ce_value + aux_value}) at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        (ce + aux).backward()
        if self.sharding is not None:
            self.sharding.sync_gradients()
        grad_norm = float("nan")
        if cfg.grad_clip > 0:
            grad_norm = (self.sharding.clip_grad_norm(cfg.grad_clip) if self.sharding is not None else
                         float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)))
        self.optimizer.step()
        vios, loads = _layer_stats(self.model, self.layout)
        end_step(self.model)
        if not self._weights_finite():
            raise NonFiniteLoss(f"the update of step {self.step + 1} (loss {ce_value + aux_value:.4g}) made the "
                                "weights non-finite")
        self.step += 1
        return {"step": self.step, "loss": ce_value, "aux_loss": aux_value, "bits_per_byte": ce_value / LN2,
                "lr": lr, "grad_norm": grad_norm, "max_vio": vios, "load": loads,
                **(self.extra_loss.metrics() if self.extra_loss is not None else {})}

    def _weights_finite(self) -> bool:
        """Whether every floating-point parameter and buffer is finite (on every rank)."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        ok = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
        if self.sharding is not None:
            import torch.distributed as dist

            flag = torch.tensor([0.0 if ok else 1.0])
            dist.all_reduce(flag, group=self.layout.data_group)
            ok = not float(flag)
        return ok

    def _losses(self, input_ids_BL: torch.Tensor, targets_BL: torch.Tensor):
        """``(ce, aux, ce value, aux value)`` of one batch: the mean next-token cross-entropy and the routers'
        losses. Under expert parallelism this rank runs its rows of the global batch and its losses are its
        shares of the global batch's (gradients are then summed, see :mod:`moekit.parallel.sharding`); the
        values are the global losses."""
        if self.sharding is None:
            input_ids_BL, targets_BL = input_ids_BL.to(self.cfg.device), targets_BL.to(self.cfg.device)
            logits_BLV = self.model(input_ids_BL, attention_mask=padding_mask(input_ids_BL))
            ce = F.cross_entropy(logits_BLV.float().reshape(-1, logits_BLV.shape[-1]), targets_BL.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
            aux = aux_loss(self.model)
            if self.extra_loss is not None:  # fine-tuning regulariser (moekit.adapt.finetune)
                aux = aux + self.extra_loss(self.model, input_ids_BL, targets_BL)
            return ce, aux, float(ce.detach()), float(aux.detach())
        import torch.distributed as dist

        layout = self.layout
        # Routers' noise (jitter, Gumbel / logistic samples) draws a stream of its own on every rank, fixed by
        # (seed, step, rank) so that a resumed run draws the same.
        torch.manual_seed(self.cfg.seed + 1_000_003 * (self.step + 1) + 7919 * layout.rank)
        rows = input_ids_BL.shape[0] // layout.world_size
        mine = slice(layout.rank * rows, (layout.rank + 1) * rows)
        input_ids_BL, targets_BL = input_ids_BL[mine], targets_BL[mine]
        scored = torch.tensor([float((targets_BL != IGNORE_INDEX).sum())], dtype=torch.float64)
        dist.all_reduce(scored, group=layout.data_group)
        logits_BLV = self.model(input_ids_BL, attention_mask=padding_mask(input_ids_BL))
        ce = F.cross_entropy(logits_BLV.float().reshape(-1, logits_BLV.shape[-1]), targets_BL.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum") / max(float(scored), 1.0)
        aux = aux_loss(self.model)
        totals = torch.stack([ce.detach(), aux.detach()]).double()
        dist.all_reduce(totals, group=layout.data_group)
        return ce, aux, float(totals[0]), float(totals[1])

    # ---------------------------------------------------------------- loop
    def fit(self, on_step=None, desc: str = "train", leave: bool = True) -> dict:
        """Train to ``cfg.steps``: metrics, checkpoints, progress bar; ``on_step(trainer, record)`` after each step.

        Ctrl-C: in a single process the first Ctrl-C lets the current step finish (a second one stops at once).
        On ``KeyboardInterrupt`` a checkpoint is written only when the trainer's state is that of a completed,
        logged step which has no checkpoint yet; otherwise (stopped inside a step, or under torchrun) the last
        checkpoint is kept as it is. Either way :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) says
        which checkpoint a resume starts from, and the resumed run repeats the uninterrupted one bit for bit.
        A non-finite loss, or weights made non-finite by an update, raise :class:`NonFiniteLoss` before
        anything is saved: the kept checkpoint is the last one whose weights are finite.
        """
        from tqdm import tqdm

        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len
        main = self.layout.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step", file=sys.stderr, leave=leave,
                   disable=not (self.progress and main), dynamic_ncols=True)
        # True while the in-memory state (model, optimiser, sampler, RNG, balancing, metrics file) is exactly what
        # a checkpoint of ``self.step`` holds: between the logging of one step and the start of the next.
        self._boundary = True
        sigint = _DeferredSigint(enabled=self.sharding is None)
        try:
            with sigint, open(self.metrics_path if main else os.devnull, "a", encoding="utf-8") as metrics:
                while self.step < cfg.steps:
                    sigint.check()
                    t0 = time.perf_counter()
                    rec = self.train_step()
                    dt = time.perf_counter() - t0
                    self.elapsed += dt
                    rec["tokens_per_s"] = tokens_per_step / dt
                    rec["step_time_s"] = dt
                    rec["time"] = self.elapsed
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        ev = evaluate(self.model, self.corpus, cfg.seq_len, cfg.batch_size, cfg.eval_windows,
                                      layout=self.layout)
                        rec["val_bits_per_byte"] = ev["bits_per_byte"]
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    self._boundary = True
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save()
                    if on_step is not None:
                        on_step(self, rec)
                    vio = sum(rec["max_vio"]) / max(1, len(rec["max_vio"]))
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", bpb=f"{rec['bits_per_byte']:.3f}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}", maxvio=f"{vio:.2f}", refresh=False)
                    bar.update(1)
                sigint.check()
        except NonFiniteLoss as exc:
            bar.close()
            kept = latest_step(self.run_dir)
            where = (f"the last good checkpoint (step {kept}, finite weights) is kept in {self.run_dir}"
                     if kept is not None else f"no checkpoint was saved in {self.run_dir} (the first would have "
                                              f"been at step {min(cfg.checkpoint_every, cfg.steps)})")
            raise NonFiniteLoss(f"{exc}; training stopped; {where}") from None
        except KeyboardInterrupt:
            bar.close()
            raise self._interrupted() from None
        bar.close()
        return {"steps": self.step, "elapsed": self.elapsed}

    def _interrupted(self) -> TrainingInterrupted:
        """Checkpoint bookkeeping after a ``KeyboardInterrupt`` (see :meth:`fit`)."""
        saved = False
        # Under torchrun the other ranks may be anywhere: no collective save, the last checkpoint stays intact.
        if self.sharding is None and self._boundary and self.step > 0 and latest_step(self.run_dir) != self.step:
            try:
                self.save()
                saved = True
            except KeyboardInterrupt:  # a second Ctrl-C during the save: the previous checkpoint is intact
                pass
        return TrainingInterrupted(self.step, latest_step(self.run_dir), saved)


def describe(model: torch.nn.Module, model_cfg: ModelConfig) -> str:
    counts = param_counts(model)
    moe = model_cfg.moe
    causal = routing_is_causal(model)
    experts = f"{moe.num_experts} experts top-{moe.top_k}"
    if model_cfg.moe_overrides:  # per-layer settings: experts/top-k of each MoE layer
        experts = "experts/top-k per MoE layer " + ", ".join(
            f"{i}: {m.num_experts}/{m.top_k}" for i, m in model_cfg.layer_moes.items())
    text = (f"model: {model_cfg.n_layers} layers, width {model_cfg.dim}, {experts} "
            f"(router {moe.router}), {counts['total'] / 1e6:.2f}M parameters, "
            f"{counts['active'] / 1e6:.2f}M active per token")
    if not causal:
        text += ("\nnote: this router looks at the whole batch (not causal): a token's route depends on later "
                 "tokens, so training sees the future; generation uses the router's causal fallback")
    return text


def run_training(run_dir: Path, run_config: dict, *, resume: bool, log=print, progress: bool = True,
                 layout: ParallelLayout | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the final evaluation record.

    Under ``layout`` (torchrun) every rank runs this; only rank 0 logs and writes files.
    """
    layout = layout if layout is not None else ParallelLayout.single()
    if not layout.is_main:
        log, progress = (lambda *a, **k: None), False
    from ..data.select import corpus_for_run

    corpus = corpus_for_run(run_config)  # data.path, restricted to data.include_domains / exclude_domains
    trainer = Trainer(run_dir, run_config, corpus, log=log, progress=progress, layout=layout)
    if not resume and run_config.get("finetune"):  # a fine-tune starts from its source run's weights
        from ..adapt.finetune import load_initial_weights

        load_initial_weights(trainer, run_config["finetune"])
    if resume:
        trainer.resume()
        if layout.is_main:  # the run's settings change (--steps, --expert-parallel) only once it has resumed
            from ..io import atomic_write_json

            atomic_write_json(Path(run_dir) / "config.json", run_config)
        log(f"resuming {run_dir} at step {trainer.step}/{trainer.cfg.steps}")
    log(corpus.summary())
    log(trainer.description)
    cfg = trainer.cfg
    log(f"training {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens -> {run_dir}")
    if trainer.sharding is not None:
        log(f"expert parallel: {layout.world_size} processes, experts sharded over {layout.ep_size} "
            f"({cfg.batch_size // layout.world_size} sequences per process), {trainer.chunks} overlap chunk(s)")
        if trainer.cost_model is not None:
            fit = trainer.cost_model
            log(f"overlap chunks chosen by the cost model fitted here: all-to-all {fit.comm.intercept * 1e6:.0f} us + "
                f"{fit.comm.slope * 1e9:.3f} ns/byte, experts {fit.compute.intercept * 1e6:.0f} us + "
                f"{fit.compute.slope * 1e6:.2f} us/row")
        if any(m.capacity_factor is not None for m in trainer.model_cfg.layer_moes.values()):
            log("note: with a capacity factor each process drops pairs by its own tokens' capacity, so results "
                "differ from one process (dropless routing matches it)")
    trainer.fit()
    ev = evaluate(trainer.model, corpus, cfg.seq_len, cfg.batch_size, cfg.final_eval_windows,
                  progress=progress, layout=layout)
    if not layout.is_main:
        return ev
    base = unigram_baseline(corpus)["bits_per_byte"]
    ev["unigram_bits_per_byte"] = base
    ev["elapsed_train_s"] = trainer.elapsed
    ev["step"] = trainer.step
    with open(trainer.metrics_path, "a", encoding="utf-8") as metrics:
        metrics.write(json.dumps({"step": trainer.step, "eval": {k: ev[k] for k in
                                                                 ("loss", "bits_per_byte", "perplexity")}}) + "\n")
    below = 100.0 * (1 - ev["bits_per_byte"] / base)
    log(f"validation: {ev['bits_per_byte']:.3f} bits/byte; order-0 (unigram) baseline {base:.3f} bits/byte "
        f"({below:.1f}% below)")
    return ev
