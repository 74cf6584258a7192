"""One trainer for every task: it only calls ``loss, outputs = task(batch)`` (``mimkit/engine/task.py``).

It never imports, names or inspects a method: a subclass (``mimkit/pretraining.py`` for pretraining,
``mimkit/eval/finetune.py`` for fine-tuning) supplies the images, the task and the dataset through three hooks.
Run safety (verified checkpoints, one run per folder, clean stops on every rank, the divergence guard, exact resume)
is described in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import mimkit
from mimkit.config import PretrainConfig, save_yaml
from mimkit.data import compute_mean_std
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.data import default_workers, epoch_data
from mimkit.engine.distributed import all_reduce_, broadcast_object, cleanup, gather_objects, init_distributed
from mimkit.engine.guard import DivergenceGuard, parameter_norm
from mimkit.engine.host_memory import huge_page_heap, keep_freed_memory
from mimkit.engine.metrics import RunRecorder, setup_logging, truncate_metrics
from mimkit.engine.optim import absolute_lr, build_optimizer, build_scheduler
from mimkit.engine.run_folder import RunLock, existing_outputs, move_aside
from mimkit.engine.signals import StopSignals
from mimkit.engine.task import Task
from mimkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MimkitError,
    RankLost,
    SaveFailed,
    TrainingDiverged,
)
from mimkit.models.layers import set_cpu_linear

__all__ = ["Trainer", "TrainingDiverged", "autocast_context"]


class _Rollback(Exception):
    """Raised inside an epoch when the guard decides to reload the last verified checkpoint."""


# Options that change how fast a run goes or how it is laid out, not what it trains: a resume with new values is not
# worth a warning (the batch layout has its own, ``Trainer.relayout``).
OPTIONS_FREE_TO_CHANGE = frozenset(
    {
        "num_workers",
        "compile",
        "host_memory",
        "host_huge_pages",
        "cpu_linear",
        "cpu_autocast",
        "grad_checkpointing",
        "strategy",
        "max_steps",
        "time_limit_min",
        "batch_size",
        "accum_steps",
        "shuffle_buffer",
        "viz_bands",
    }
)


def autocast_context(precision: str, device: torch.device, cpu_autocast: bool = False):
    """bf16/fp16 autocast for ``precision`` on the device (on CPU only with ``cpu_autocast``), else a no-op."""
    if precision == "fp32" or (device.type == "cpu" and not cpu_autocast):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Training loop of small named steps: ``setup``, ``train_one_epoch`` (``forward_backward``,
    ``optimizer_step``, ``log_step``, ``maybe_save``), ``end_epoch``, ``save``, ``rollback``, ``finish``.

    Subclasses provide ``training_images()``, ``build_task()`` and ``build_dataset(images)``; ``after_epoch`` is an
    optional hook (fine-tuning evaluates there).
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.extra_summary: dict = {}
        self.last_checkpoint: Path | None = None
        self.keep_after_save: list[str] = []
        self.signals = StopSignals()
        self.lock: RunLock | None = None
        self.stopped: str | None = None  # "signal:SIGTERM", "time limit", "max steps"
        self.param_norm = 0.0  # of the current weights (measure_params)
        self.loss_sum: torch.Tensor  # the losses of the micro-batches of the current step

    # -- what a task provides ----------------------------------------------------------------------------------
    def training_images(self):
        """The images to train on (an ``ImageList``)."""
        raise NotImplementedError

    def build_task(self) -> torch.nn.Module:
        """The task to train (see ``mimkit/engine/task.py``); built after seeding, identical on every rank."""
        raise NotImplementedError

    # Whether FSDP may build the task on the meta device (rank 0 alone builds it for real); a task whose
    # construction reads data (a fine-tuning encoder's weights) sets it to False.
    build_on_meta = True

    def checked_task(self, meta: bool = False) -> Any:
        """``build_task()`` (on the meta device when ``meta``), checked against the Task protocol."""
        if meta:
            with torch.device("meta"):
                task = self.build_task()
        else:
            task = self.build_task()
        if not isinstance(task, Task) or not isinstance(task, torch.nn.Module):
            missing = [
                m
                for m in (
                    "lr_base_batch",
                    "betas",
                    "default_grad_clip",
                    "img_size",
                    "param_groups",
                    "before_optimizer_step",
                    "after_optimizer_step",
                    "describe",
                )
                if not hasattr(task, m)
            ]
            raise TypeError(
                f"{type(task).__name__} is not a trainer task (an nn.Module with the Task protocol of "
                f"mimkit/engine/task.py); missing: {', '.join(missing) or 'nn.Module'}"
            )
        return task

    def build_dataset(self, images) -> Dataset:
        """A map-style dataset (``ImageDataset``) or an iterable one with a plan (``ShardDataset``)."""
        raise NotImplementedError

    def after_epoch(self, record) -> None:
        """Called on every rank at the end of each epoch, before its checkpoint; ``record(dict)`` logs metrics and
        names appended to ``self.keep_after_save`` (e.g. "best.pt") become permanent copies of that checkpoint."""

    # -- set-up -----------------------------------------------------------------------------------------------
    def prepare_output(self) -> None:
        """Rank 0: lock the folder, refuse or move aside an earlier run's outputs, clean interrupted writes."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out)
        self.lock.acquire()
        self.store.clean_leftovers()
        if cfg.resume == "none":
            old = [p.name for p in existing_outputs(self.out) if p.suffix in (".pt", ".dcp")]
            if old and not cfg.overwrite:
                raise ConfigError(
                    f"{self.out}: holds checkpoints of an earlier run ({', '.join(old[:3])}) and "
                    "--resume none would mix the two runs. Give another --output, resume with "
                    "--resume auto, or pass --overwrite to move the old files aside."
                )
            if cfg.overwrite:
                move_aside(self.out)

    def setup(self) -> None:
        """Output folder and lock, logging, data, task, optimizer, schedule, sharding, resume or initial weights."""
        cfg = self.cfg
        self.dist = d = init_distributed(timeout_min=cfg.dist_timeout_min)
        self.out = Path(cfg.output)
        self.store = ckpt.CheckpointStore(self.out, cfg.keep_last)
        error = None
        if d.is_main:
            try:
                self.prepare_output()
            except Exception as err:  # every rank must learn of it, or the others wait at the barrier forever
                error = err
        failed = broadcast_object(type(error).__name__ if error is not None else None)
        if error is not None:
            raise error
        if failed:
            raise SystemExit(2)  # rank 0 reports the reason
        self.log = setup_logging(self.out, d.is_main, d.rank)
        if d.note:
            self.log.warning("%s", d.note)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.host_memory_kept = cfg.host_memory == "keep" and keep_freed_memory()
        set_cpu_linear(cfg.cpu_linear)

        images = self.training_images()
        if d.is_main and getattr(images, "ignored", None):
            self.log.info(
                "%s: ignored %d file(s) of unsupported types: %s",
                images.root,
                sum(images.ignored.values()),
                ", ".join(f"{ext or '(none)'} {n}" for ext, n in sorted(images.ignored.items())),
            )

        self.fsdp = cfg.strategy == "fsdp" and d.distributed
        # FSDP: rank 0 alone builds the full task (on the CPU); the others build it on the meta device
        on_meta = self.fsdp and self.build_on_meta
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        task = self.checked_task(meta=on_meta and not d.is_main)
        if cfg.compute_mean_std:  # after the task is built: a size or option it refuses stops the run before this read
            mean, std = compute_mean_std(images.paths, max_images=1000, seed=cfg.seed, in_chans=cfg.in_chans)
            cfg.mean, cfg.std = list(mean), list(std)
            self.log.info("dataset mean %s std %s", cfg.mean, cfg.std)
        self.resume_from = self.find_checkpoint()
        self.model: Any = task if on_meta else task.to(d.device)
        # A fresh run's starting weights go in before sharding; a resume loads its checkpoint after it.
        if self.resume_from[0] is None and (d.is_main or not on_meta):
            self.initial_weights()
        if self.fsdp:
            from mimkit.engine.fsdp import materialise_shards, shard_model

            bf16 = cfg.precision == "bf16" and d.device.type == "cuda"
            if on_meta:  # every rank shards a meta twin and receives its shard of rank 0's weights
                twin = self.checked_task(meta=True) if d.is_main else task
                blocks = shard_model(twin, bf16=bf16)
                materialise_shards(twin, task if d.is_main else None, d.device)
                self.model = twin
                del task
            else:
                blocks = shard_model(self.model, bf16=bf16)
            self.log.info(
                "FSDP: %d blocks and the model sharded over %d ranks%s",
                blocks,
                d.world_size,
                " (built on the meta device, each rank's shard materialised from rank 0's copy)" if on_meta else "",
            )
        fmt = cfg.checkpoint_format
        self.sharded_checkpoints = fmt == "sharded" or (fmt == "auto" and self.fsdp)
        size = self.model.img_size
        cfg.img_size = list(size) if isinstance(size, tuple) else size  # (height, width) saved as a YAML list
        self.dataset = self.build_dataset(images)
        if hasattr(self.dataset, "seed"):
            self.dataset.seed = cfg.seed  # augmentation depends on (seed, epoch, index) only: exact resume
        self.num_workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers(d.device, d.local_world_size)
        self.data = epoch_data(self.dataset, cfg.batch_size, self.num_workers, d.rank, d.world_size, cfg.seed)
        batches = self.data.batches_per_epoch()
        if batches < 1:
            raise DataError(
                f"{cfg.data}: {len(images)} images give {self.data.per_rank()} per process, fewer "
                f"than one batch of {cfg.batch_size}. Lower --batch-size (or use fewer processes or workers)."
            )
        self.steps_per_epoch = batches // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"accum_steps (--accum-steps) = {cfg.accum_steps}: larger than the {batches} batches "
                "of one epoch; lower --accum-steps or --batch-size"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.eff_batch = cfg.batch_size * cfg.accum_steps * d.world_size
        self.lr = absolute_lr(cfg.blr, self.eff_batch, self.model.lr_base_batch, cfg.lr)
        betas = cfg.betas or self.model.betas
        self.grad_clip = cfg.grad_clip if cfg.grad_clip is not None else self.model.default_grad_clip
        self.optimizer = build_optimizer(self.model.param_groups(cfg.weight_decay), self.lr, betas, d.device)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.min_lr)
        if d.is_main and warmup >= self.total_steps > 1:
            self.log.warning(
                "warm-up (--warmup-epochs %g: %d steps) is as long as the run (%d steps): the lr rises to its peak "
                "at the last step and never decays; lower --warmup-epochs for a short run",
                cfg.warmup_epochs,
                warmup,
                self.total_steps,
            )
        self.fp16 = cfg.precision == "fp16" and d.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.fp16)
        self.guard = DivergenceGuard(cfg.loss_spike_factor, cfg.param_norm_factor)

        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.schedule_offset = 0  # the lr schedule's position minus the step counter (after a resume's relayout)
        self.lr_scale, self.rollbacks = 1.0, 0
        self.saved_step = (-1, -1)
        if not self.resume():
            torch.manual_seed(cfg.seed + 1000 * d.rank)  # masks and augmentation differ across ranks
        if d.is_main:  # records an interrupted attempt wrote past the step this run starts from
            truncate_metrics(self.out / "metrics.jsonl", self.step)
        self.guard.reset(self.measure_params())

        self.train_model: Any = self.model
        if d.distributed and not self.fsdp:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if d.is_main:
            save_yaml(cfg.to_dict(), self.out / "config.yaml")
            self.log_start(len(images))

    def log_start(self, n_images: int) -> None:
        """One log line with the model, data, batch, precision and schedule of the run."""
        cfg, d = self.cfg, self.dist
        info = self.model.describe()
        effective = cfg.precision
        if d.device.type == "cpu" and cfg.precision != "fp32":
            effective = (
                "bf16 autocast"
                if cfg.cpu_autocast
                else f"fp32 ({cfg.precision} autocast is GPU-only unless --cpu-autocast)"
            )
        self.log.info(
            "mimkit %s | %s | %.2fM encoder / %.2fM total params | %d images | %d step(s)/epoch | "
            "effective batch %d | lr %.3g | %s on %s x%d | workers %d",
            mimkit.__version__,
            cfg.model,
            info["encoder_params"] / 1e6,
            info["total_params"] / 1e6,
            n_images,
            self.steps_per_epoch,
            self.eff_batch,
            self.lr,
            effective,
            d.device.type,
            d.world_size,
            self.num_workers,
        )
        if self.host_memory_kept:
            pages = "2 MiB" if huge_page_heap() else "4 KiB"
            self.log.info(
                f"host memory: freed blocks kept for reuse, heap pages of {pages} (glibc; --host-memory, "
                "--host-huge-pages)"
            )

    # -- resume and rollback ---------------------------------------------------------------------------------
    def find_checkpoint(self) -> tuple[Path | None, dict | None]:
        """Rank 0 decides which checkpoint to continue from (moving unusable ones aside); every rank learns it.
        Returns (path, its state where rank 0 already loaded it)."""
        cfg = self.cfg
        path, state = None, None
        if self.dist.is_main:
            if cfg.resume == "auto":
                found = self.store.latest()
                path, state = found if found else (None, None)
                if path is None and list((self.out / ckpt.QUARANTINE).glob("checkpoint-*")):
                    self.log.warning(
                        "%s: no usable checkpoint (unusable ones are in %s/); starting from step 0",
                        self.out,
                        ckpt.QUARANTINE,
                    )
            elif cfg.resume != "none":
                path = Path(cfg.resume)
        path = broadcast_object(str(path) if path is not None else None)
        return (Path(path) if path is not None else None), state

    def load_state(self, path: Path, state: dict | None = None) -> None:
        """Load model, optimizer, scaler, schedule position, counters and RNG states from a checkpoint."""
        cfg = self.cfg
        state = state if state is not None else ckpt.load_checkpoint(path)
        is_sharded = state.get("format") == "sharded"
        if not is_sharded and ("model" not in state or "optimizer" not in state):
            raise CheckpointError(f"{path}: not a mimkit training checkpoint (no 'model' or 'optimizer' entry)")
        if state.get("model_name") != cfg.model:
            raise CheckpointError(
                f"{path}: checkpoint is for model '{state.get('model_name')}', this run builds "
                f"'{cfg.model}'. Use another --output, or --resume none --overwrite."
            )
        if is_sharded:  # collective: DCP reshards onto this run's ranks, sharded or not
            from mimkit.engine import sharded

            sharded.load_into(path, self.model, self.optimizer)
        elif self.fsdp:
            from mimkit.engine.fsdp import load_full_state

            try:
                load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            except (ValueError, KeyError, RuntimeError, IndexError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointError(
                    f"{path}: does not fit this model and optimizer ({first}). Were the model options changed? "
                    "Use the same options, or another --output."
                ) from None
        else:
            ckpt.load_weights(
                self.model,
                state["model"],
                path,
                cfg.model,
                hint=" Were the model options changed? Use the same options, or another --output.",
            )
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as err:
                fitted = ckpt.without_stateless_params(state["optimizer"], self.optimizer)
                if fitted is None:
                    raise CheckpointError(f"{path}: optimizer state does not fit this run ({err})") from None
                self.optimizer.load_state_dict(fitted[0])
                for group in self.optimizer.param_groups:  # each moment where its parameter is, or stop here
                    for p in group["params"]:
                        moment = self.optimizer.state.get(p, {}).get("exp_avg")
                        if moment is not None and moment.shape != p.shape:
                            raise CheckpointError(f"{path}: optimizer state does not fit this run ({err})") from None
                self.log.warning(
                    "%s: %d parameter(s) that never had a gradient (no optimizer state) left out of its optimizer "
                    "state: this model now keeps them frozen",
                    path.name,
                    fitted[1],
                )
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.schedule_offset = int(state.get("schedule_offset", 0))
        saved = state.get("config") or {}
        old = state.get("layout") or {  # before layouts were saved: the world size is taken to be this run's
            **self.layout(),
            "batch_size": saved.get("batch_size", cfg.batch_size),
            "accum_steps": saved.get("accum_steps", cfg.accum_steps),
        }
        if old != self.layout():
            self.relayout(old, path)
        self.report_changed_options(saved, path)
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.extra_summary.update(state.get("extra", {}))
        self.last_checkpoint = path
        self.saved_step = (self.step, self.epoch)
        rng = state["rng"][self.dist.rank] if self.dist.rank < len(state["rng"]) else None
        if rng is not None:
            ckpt.restore_rng(rng)

    def report_changed_options(self, saved: dict, path: Path) -> None:
        """A warning naming the options that differ from the checkpoint's run (a requeue from an edited job script),
        those that change what is trained: data, model, schedule, augmentation. Not the layout (``relayout`` says
        it), the output, safety or speed options, nor options the checkpoint's mimkit did not have."""
        if not self.dist.is_main or not isinstance(saved, dict):
            return
        now = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        then = json.loads(json.dumps(saved, default=str))
        groups = {f.name: f.metadata.get("group") for f in dataclasses.fields(self.cfg)}
        changed = [
            name
            for name, value in now.items()
            if name in then
            and then[name] != value
            and groups.get(name) not in ("output", "safety")
            and name not in OPTIONS_FREE_TO_CHANGE
        ]
        if not changed:
            return
        self.log.warning(
            "%s was written with other options: %s. This run goes on with its own%s",
            path.name,
            ", ".join(f"{name} {then[name]!r} -> {now[name]!r}" for name in changed),
            " (the lr follows the new schedule from this step on: it jumps where the schedule moved)"
            if {"epochs", "warmup_epochs", "blr", "lr", "min_lr"} & set(changed)
            else "",
        )

    def initial_weights(self) -> None:
        """A fresh run's starting weights (after the task's own initialization); nothing by default."""

    def resume(self) -> bool:
        """Continue from the newest verified checkpoint when asked (``--resume``); True if it did."""
        path, state = self.resume_from
        self.resume_from = (path, None)  # do not keep a second copy of the checkpoint for the whole run
        if path is None:
            return False
        self.load_state(path, state)
        self.log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)
        return True

    def rollback(self, reason: str) -> None:
        """Reload the newest verified checkpoint, lower the learning rate, continue."""
        path = broadcast_object(str(self.store.newest_verified()) if self.dist.is_main else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.load_state(Path(path))
        self.rollbacks += 1
        self.lr_scale *= self.cfg.rollback_lr_factor
        self.guard.reset(self.measure_params())
        self.bad_in_a_row = 0
        self.log.warning(
            "divergence (%s): rolled back to %s (step %d) with the learning rate x %.3g (rollback %d of %d)",
            reason,
            Path(path).name,
            self.step,
            self.lr_scale,
            self.rollbacks,
            self.cfg.max_rollbacks,
        )

    def diverged(self, reason: str) -> None:
        """Roll back or stop, as configured; never returns."""
        cfg = self.cfg
        has_ckpt = broadcast_object(self.store.newest_verified() is not None if self.dist.is_main else None)
        if cfg.on_divergence == "rollback" and has_ckpt and self.rollbacks < cfg.max_rollbacks:
            raise _Rollback(reason)
        where = self.restart_hint()
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {reason}; stopping. {where} Lower "
            "--blr, set --grad-clip, or use --precision bf16 or fp32, then rerun."
        )

    def restart_hint_local(self) -> str:
        """Like ``restart_hint`` without a collective (for when the process group is broken)."""
        found = self.store.newest_verified() if self.dist.is_main else None
        if found is not None:
            return f"a restart (--resume auto) continues from {found}."
        return "a restart continues from the newest verified checkpoint in --output, if any."

    def restart_hint(self) -> str:
        """What a restart would continue from, for the final log line of a stopped run."""
        path = broadcast_object(str(self.store.newest_verified() or "") if self.dist.is_main else None)
        if path:
            return f"A restart (--resume auto) continues from {path}."
        return "No checkpoint has been written: a restart begins from step 0."

    # -- checkpointing ----------------------------------------------------------------------------------------
    def save(self, reason: str) -> None:
        """Rank 0 writes a verified checkpoint of the current step (collective: every rank must call it)."""
        rngs = gather_objects(ckpt.capture_rng())
        skipped = gather_objects(sorted(self.skipped.items()))
        if (self.step, self.epoch) == self.saved_step:
            return
        norm = self.param_norm  # of exactly these weights: measured after the last change to them
        problem = self.guard.check_params(norm)
        if problem:  # every rank holds the same weights, so every rank takes this branch
            self.diverged(problem + " (checkpoint not written)")
        failure = None
        if self.sharded_checkpoints:  # every rank writes and reads back its own shards
            failure = self.write_sharded(reason, rngs, skipped)
        else:
            gathered = None
            if self.fsdp:  # every rank takes part in gathering the full state; rank 0 writes it
                from mimkit.engine.fsdp import full_state

                gathered = full_state(self.model, self.optimizer)
            if self.dist.is_main:
                try:
                    self.write_checkpoint(reason, rngs, skipped, gathered)
                except SaveFailed as err:
                    failure = str(err)
        failure = broadcast_object(failure)  # every rank stops with the same message, none waits for rank 0
        if failure is not None:
            raise SaveFailed(failure)
        self.saved_step = (self.step, self.epoch)
        self.guard.reference_norm = norm
        self.last_save = time.time()

    def write_checkpoint(self, reason: str, rngs: list, skipped: list, gathered: tuple | None = None) -> None:
        """Rank 0: the checkpoint file (verified), the permanent epoch copy, skipped_images.tsv. ``gathered``: the
        full (model, optimizer) state of a sharded model, in the same format as the unsharded ones."""
        model_state, optim_state = gathered or (self.model.state_dict(), self.optimizer.state_dict())
        state = {"model": model_state, "optimizer": optim_state, **self.train_state(rngs)}
        path = self.store.save(state, self.step)
        self.after_write(path, reason, skipped)

    def train_state(self, rngs: list) -> dict:
        """Everything of a checkpoint besides the model and optimizer tensors."""
        return {
            "scaler": self.scaler.state_dict() if self.fp16 else {},
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rngs,
            "model_name": self.cfg.model,
            "config": self.cfg.to_dict(),
            "mimkit_version": mimkit.__version__,
            "extra": dict(self.extra_summary),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "layout": self.layout(),
            "schedule_offset": self.schedule_offset,
        }

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode for work outside the training step (an evaluation, a figure), in train mode again
        after. Under FSDP the root's own parameters (patch embedding, norms, heads: all outside the sharded blocks)
        are gathered for it: only the root's forward gathers them, and an evaluation calls other methods or a
        submodule. Each block still gathers its own as it runs, so every rank takes part (as the callers do)."""
        self.model.eval()
        if self.fsdp:
            self.model.unshard()
        try:
            yield
        finally:
            if self.fsdp:
                self.model.reshard()
            self.model.train()

    def layout(self) -> dict:
        """How this run turns images into steps: processes, batch per process, micro-batches per step."""
        return {
            "world_size": self.dist.world_size,
            "batch_size": self.cfg.batch_size,
            "accum_steps": self.cfg.accum_steps,
        }

    def relayout(self, old: dict, path: Path) -> None:
        """Resume a checkpoint written with another layout (a requeue on more or fewer GPUs, another batch size): the
        position in the epoch is carried over by images trained on, and the lr schedule continues from the same point
        of the same epoch; the step counter (checkpoint names, --max-steps) keeps counting."""
        cfg = self.cfg
        seen = self.batch_in_epoch * old["batch_size"] * old["world_size"]  # images of this epoch already trained on
        per_step = cfg.batch_size * self.dist.world_size * cfg.accum_steps
        steps_done = seen // per_step
        self.batch_in_epoch = steps_done * cfg.accum_steps
        position = self.epoch * self.steps_per_epoch + steps_done
        self.schedule_offset = position - self.step
        if not self.dist.is_main:
            return
        self.log.warning(
            "%s was written with %d process(es) x batch %d x %d micro-batch(es), this run has %d x %d x %d: epoch %d "
            "goes on after %d of its images (in this layout's order, not the interrupted run's) and the lr schedule "
            "at its step %d of %d; the step counter goes on from %d",
            path.name,
            old["world_size"],
            old["batch_size"],
            old["accum_steps"],
            self.dist.world_size,
            cfg.batch_size,
            cfg.accum_steps,
            self.epoch + 1,
            steps_done * per_step,
            position,
            self.total_steps,
            self.step,
        )

    def write_sharded(self, reason: str, rngs: list, skipped: list) -> str | None:
        """Collective: a sharded checkpoint (``mimkit/engine/sharded.py``); returns the failure message or None."""
        from mimkit.engine import sharded

        main = self.dist.is_main
        final = ckpt.checkpoint_path(self.out, self.step, sharded=True)
        tmp = Path(broadcast_object(str(final.parent / f".{final.name}.tmp{os.getpid()}") if main else None))
        train_state = {**self.train_state(rngs), "format": "sharded"} if main else None
        problem = sharded.write(tmp, sharded.state_dicts(self.model, self.optimizer), train_state)
        if not main:
            return None
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return (
                f"{final}: {problem}, so it was removed; free disk space or fix permissions in {self.out}, then "
                f"rerun to resume from {self.store.describe_latest()}"
            )
        try:
            path = self.store.commit_sharded(tmp, self.step)
            self.after_write(path, reason, skipped)
        except OSError as err:
            return f"{final}: could not be put in place ({err.strerror or err}); rerun to resume from " + str(
                self.store.describe_latest()
            )
        return None

    def after_write(self, path: Path, reason: str, skipped: list) -> None:
        """Rank 0, once a checkpoint is verified: the permanent epoch copy, skipped_images.tsv, the log line."""
        self.last_checkpoint = path
        cfg = self.cfg
        if cfg.keep_epochs_every and self.epoch % cfg.keep_epochs_every == 0 and self.batch_in_epoch == 0:
            ckpt.keep_copy(path, self.out / f"epoch-{self.epoch:04d}{path.suffix}")
        merged = dict(kv for rank_items in skipped for kv in rank_items)
        if merged:
            (self.out / "skipped_images.tsv").write_text("".join(f"{p}\t{r}\n" for p, r in sorted(merged.items())))
        self.log.info("saved %s (%s)", path.name, reason)

    # -- one step ---------------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Move the batch to the device and add the epoch (methods whose masks depend on the visit read it)."""
        for path, reason in batch.pop("skipped"):
            if path not in self.skipped:
                self.skipped[path] = reason
                self.log.warning("skipped unreadable image %s: %s (%d so far)", path, reason, len(self.skipped))
        batch = {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["epoch"] = self.epoch  # how many times each sample has been visited before
        return batch

    def forward_backward(self, batch: dict, sync: bool) -> None:
        """One micro-batch: forward under autocast, scaled backward (gradient sync only when ``sync``)."""
        cfg = self.cfg
        if self.fsdp:  # FSDP2 keeps gradients local while accumulating; DDP's no_sync does the same
            self.model.set_requires_gradient_sync(sync)
        use_no_sync = self.dist.distributed and not sync and not self.fsdp
        no_sync = self.train_model.no_sync() if use_no_sync else contextlib.nullcontext()
        with no_sync:
            with autocast_context(cfg.precision, self.dist.device, cfg.cpu_autocast):
                loss, outputs = self.train_model(batch)
            self.scaler.scale(loss / cfg.accum_steps).backward()
        self.loss_sum += loss.detach().float()
        for key, value in (outputs.get("log") or {}).items() if isinstance(outputs, dict) else ():
            self.window_extra[key] = self.window_extra.get(key, 0.0) + value.detach().float() / cfg.accum_steps
        self.images_seen += batch["image"].shape[0]

    def stop_requests(self) -> list[bool]:
        """[a stop signal arrived, the time limit passed, a periodic save is due] as this rank sees it."""
        cfg = self.cfg
        out_of_time = cfg.time_limit_min is not None and time.time() - self.start_time > cfg.time_limit_min * 60
        periodic = time.time() - self.last_save > cfg.save_every_minutes * 60
        return [self.signals.received is not None, out_of_time, periodic]

    def agree(self, skip: bool) -> bool:
        """One collective (max over ranks) decides skip / stop / save for every rank alike; returns skip."""
        d = self.dist
        flags = torch.tensor([skip, *self.stop_requests()], dtype=torch.float32, device=d.device)
        skip, signal_, out_of_time, periodic = (bool(v) for v in all_reduce_(flags, op="max").tolist())
        if signal_ and not self.stopped:
            self.stopped = f"signal:{self.signals.received or 'SIGTERM (on another rank)'}"
        elif out_of_time and not self.stopped:
            self.stopped = "time limit"
        self.stop_now = signal_ or out_of_time
        self.save_now = self.stop_now or periodic
        return skip

    def optimizer_step(self) -> bool:
        """Clip, agree across ranks on skip / stop / save (one collective), step or skip. True if applied."""
        cfg = self.cfg
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if self.fsdp:
            from mimkit.engine.fsdp import full_norm

            grad_norm = full_norm(grad_norm)
        loss, gnorm = torch.stack([self.loss_sum / cfg.accum_steps, grad_norm.float()]).tolist()
        self.loss_sum.zero_()
        skip_reason = self.guard.check_step(loss, gnorm if not self.fp16 else 0.0)
        skip = self.agree(skip_reason is not None)
        self.last_grad_norm = gnorm
        if skip:
            if self.fp16:
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.log.warning(
                "step %d: %s; step skipped (%d in a row, limit %d)",
                self.step + 1,
                skip_reason or "another rank skipped it",
                self.bad_in_a_row,
                cfg.max_bad_steps,
            )
            if self.bad_in_a_row >= cfg.max_bad_steps:
                self.diverged(f"{self.bad_in_a_row} consecutive steps skipped (last: {skip_reason or 'another rank'})")
            self.scheduler.step_update(self.position)
            self.apply_lr_scale()
            return False
        self.model.before_optimizer_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        self.bad_in_a_row = 0
        self.step += 1
        self.guard.accept(loss)
        self.last_loss = loss
        self.window_loss += loss
        self.window_n += 1
        problem = self.guard.check_params(self.measure_params())
        if problem:
            self.diverged(problem)
        if cfg.max_steps is not None and self.step >= cfg.max_steps:  # the same on every rank
            self.stop_now = self.save_now = True
            self.stopped = self.stopped or "max steps"
        self.scheduler.step_update(self.position)
        self.apply_lr_scale()
        return True

    def measure_params(self) -> float:
        """The parameter norm, kept in ``param_norm`` for the next save (the weights change only in a step)."""
        if self.fsdp:
            from mimkit.engine import fsdp

            self.param_norm = float(fsdp.parameter_norm(self.model.parameters()))
        else:
            self.param_norm = float(parameter_norm(self.model.parameters()))
        return self.param_norm

    def apply_lr_scale(self) -> None:
        """Scale every group's learning rate after a rollback lowered it (``lr_scale``)."""
        if self.lr_scale != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_scale

    def log_step(self, applied: bool) -> None:
        """Every ``--log-every`` steps: loss, lr, norms, images/s and the method's extras to the loggers."""
        cfg, d = self.cfg, self.dist
        self.window_steps += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.rec.step(1 if applied else 0, loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}")
        if not applied or not (self.step % cfg.log_every == 0 or self.position == self.total_steps):
            return
        elapsed = time.time() - self.window_t0
        ips = self.images_seen * d.world_size / max(elapsed, 1e-9)
        mean_loss = self.window_loss / max(self.window_n, 1)
        self.rec.step(0, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        extra = {k: float(v) / max(self.window_steps, 1) for k, v in self.window_extra.items()}
        self.rec.log(
            {
                "step": self.step,
                "epoch": round(self.position / self.steps_per_epoch, 4),
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": self.last_grad_norm,
                "images_per_s": ips,
                "skipped_images": len(self.skipped),
                **extra,
            },
            self.step,
        )
        self.reset_window()

    def reset_window(self) -> None:
        """Start a new logging window (loss sums, image count, time)."""
        self.images_seen, self.window_loss, self.window_n, self.window_t0 = 0, 0.0, 0, time.time()
        self.window_extra: dict[str, Any] = {}
        self.window_steps = 0

    def maybe_save(self) -> bool:
        """Save when any rank asked for it; True when the run must stop now."""
        if self.save_now:
            self.save("stop" if self.stop_now else "time")
        return self.stop_now

    # -- one epoch --------------------------------------------------------------------------------------------
    def train_one_epoch(self) -> bool:
        """Train until the end of the epoch (True) or a stop request (False)."""
        cfg = self.cfg
        loader = self.data.loader(self.epoch, self.batch_in_epoch, self.dist.device)
        self.rec.describe(f"epoch {self.epoch + 1}/{cfg.epochs}")
        self.model.train()
        self.loss_sum = torch.zeros((), device=self.dist.device)
        usable = self.data.batches_per_epoch() // cfg.accum_steps * cfg.accum_steps
        micro = 0
        batches = iter(loader)
        try:
            for batch in batches:
                if self.batch_in_epoch >= usable:
                    break
                batch = self.prepare_batch(batch)
                micro += 1
                self.batch_in_epoch += 1
                self.forward_backward(batch, sync=micro == cfg.accum_steps)
                if micro < cfg.accum_steps:
                    continue
                micro = 0
                applied = self.optimizer_step()
                self.log_step(applied)
                if self.maybe_save():
                    return False
        finally:
            # an exception's traceback would keep the iterator, and so its worker processes, alive past the run
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        return True

    def end_epoch(self) -> None:
        """Count the epoch, log it, run ``after_epoch`` and save when an epoch save is due."""
        cfg = self.cfg
        self.epoch += 1
        self.batch_in_epoch = 0
        self.rec.log({"step": self.step, "epoch_done": self.epoch, "last_loss": self.last_loss}, self.step)
        self.keep_after_save = []
        self.after_epoch(
            lambda values: self.rec.log({"step": self.step, "epoch_done": self.epoch, **values}, self.step)
        )
        if self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs or self.keep_after_save:
            self.save(f"epoch {self.epoch}")
            if self.dist.is_main and self.last_checkpoint is not None:
                for name in self.keep_after_save:  # best.pt, or best.dcp for a sharded checkpoint
                    ckpt.keep_copy(self.last_checkpoint, (self.out / name).with_suffix(self.last_checkpoint.suffix))

    # -- the run ----------------------------------------------------------------------------------------------
    def finished(self) -> bool:
        """Whether the run is over: stopped, out of epochs or steps, or at ``--max-steps``."""
        cfg = self.cfg
        return (
            self.stopped is not None
            or self.epoch >= cfg.epochs
            or self.position >= self.total_steps
            or (cfg.max_steps is not None and self.step >= cfg.max_steps)
        )

    @property
    def position(self) -> int:
        """Where the run is in its ``total_steps``: the step counter, less what a resume in another layout moved
        (``relayout``: after a requeue on more GPUs the counter is ahead of this layout's steps)."""
        return self.step + self.schedule_offset

    def run(self) -> dict:
        """``setup``, ``train``, ``finish``, releasing the lock and the process group whatever happens."""
        self.signals.install()
        try:
            self.skipped: dict[str, str] = {}
            self.setup()
            return self.train()
        except RuntimeError as err:
            if (
                isinstance(err, MimkitError)
                or not getattr(self, "dist", None)
                or not self.dist.distributed
                or not _collective_failure(err)
            ):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:240]
            raise RankLost(
                f"a collective operation across ranks failed or timed out (--dist-timeout-min "
                f"{self.cfg.dist_timeout_min:g}): {first} Another process of this run probably died; "
                f"{self.restart_hint_local()}"
            ) from err
        finally:
            self.signals.restore()
            if self.lock is not None:
                self.lock.release()

    def train(self) -> dict:
        """Epochs of ``train_one_epoch`` and ``end_epoch`` until ``finished``."""
        cfg, d = self.cfg, self.dist
        self.last_save = self.start_time = time.time()
        self.start_step = self.step
        loggers = tuple(x.strip() for x in cfg.logger.split(",") if x.strip())
        self.rec = RunRecorder(
            self.out,
            d.is_main,
            cfg.tensorboard,
            cfg.progress,
            self.total_steps,
            self.step,
            loggers,
            cfg.to_dict(),
            progress_start=self.position,
        )
        self.bad_in_a_row, self.last_loss, self.last_grad_norm = 0, float("nan"), float("nan")
        self.reset_window()
        self.scheduler.step_update(self.position)
        self.apply_lr_scale()
        try:
            while not self.finished():
                try:
                    if not self.train_one_epoch():
                        break
                    self.end_epoch()
                except _Rollback as rb:
                    self.rollback(str(rb))
        finally:
            self.train_model = self.model  # release the DDP wrapper while the process group still exists
            self.rec.close()
        return self.finish()

    def finish(self) -> dict:
        """Final save, summary log line and the result dict (``stopped`` says why it ended)."""
        cfg, d = self.cfg, self.dist
        stopped = self.stopped if self.stopped and self.stopped.startswith("signal") else None
        if stopped:
            ended = stopped
        elif self.epoch >= cfg.epochs or self.position >= self.total_steps:
            ended = "epochs"
        elif self.stopped == "time limit":
            ended = "time_limit"
        else:
            ended = "max_steps"
        summary = {
            "model": cfg.model,
            "steps": self.step,
            "epochs_done": self.epoch,
            "final_loss": self.last_loss,
            "train_steps_this_run": self.step - self.start_step,
            "wall_time_s": round(time.time() - self.start_time, 1),
            "skipped_images": len(self.skipped),
            "rollbacks": self.rollbacks,
            "stopped_by": stopped,
            "ended_by": ended,  # epochs, max_steps, time_limit, signal:NAME
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "output": str(self.out),
            **self.extra_summary,
        }
        if d.is_main and stopped == "signal:SIGUSR1" and cfg.requeue:
            summary["requeued"] = requeue_slurm_job(self.log)
        if d.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            if stopped:
                self.log.warning(
                    "stopped by %s at step %d; resume with the same command (--resume auto) from %s",
                    stopped.split(":")[1],
                    self.step,
                    summary["checkpoint"],
                )
            if ended in ("time_limit", "max_steps"):
                how = (
                    "the same command" if ended == "time_limit" else "the command without --max-steps (or a higher one)"
                )
                self.log.info(
                    "ended at --%s after step %d of %d (epoch %d of %d): %s continues from %s",
                    "time-limit-min" if ended == "time_limit" else "max-steps",
                    self.position,
                    self.total_steps,
                    self.epoch,
                    cfg.epochs,
                    how,
                    summary["checkpoint"],
                )
            self.log.info("done: %s", json.dumps(summary))
        if not math.isfinite(self.last_loss) and self.step > self.start_step:
            self.log.warning("the last logged loss is not finite")
        return summary


def requeue_slurm_job(log) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (rank 0, after the checkpoint); True when SLURM accepted it."""
    import subprocess

    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("--requeue: not inside a SLURM job (no SLURM_JOB_ID); nothing requeued")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("--requeue: scontrol requeue %s failed (%s); resubmit the job to resume", job, err)
        return False
    if done.returncode != 0:
        log.warning(
            "--requeue: scontrol requeue %s said: %s; resubmit the job to resume",
            job,
            (done.stderr or done.stdout).strip()[:200],
        )
        return False
    log.info("requeued SLURM job %s; it resumes from the checkpoint just written", job)
    return True


def _collective_failure(err: BaseException) -> bool:
    """A failure of the process group (a peer died, a timeout), as opposed to a bug in this process."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(
        s in text
        for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out", "ProcessGroup")
    )


def run_trainer(trainer: Trainer) -> dict:
    """``trainer.run()``, then the process group is torn down whatever happened (after a barrier when it finished)."""
    finished = False
    try:
        out = trainer.run()
        finished = True
        return out
    finally:
        cleanup(finished)
