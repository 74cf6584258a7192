"""One trainer for every method: it only calls ``loss, outputs = model(batch)``."""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import mimkit
from mimkit.config import ConfigError, PretrainConfig, save_yaml
from mimkit.data import DataError, ImageDataset, compute_mean_std, find_images, pretrain_transform
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.data import ResumableSampler, build_loader, default_workers
from mimkit.engine.distributed import all_reduce_, broadcast_flag, cleanup, gather_objects, init_distributed
from mimkit.engine.metrics import RunRecorder, setup_logging
from mimkit.engine.optim import absolute_lr, build_optimizer, build_scheduler
from mimkit.methods import create_method


class TrainingDiverged(RuntimeError):
    pass


def build_model(cfg: PretrainConfig):
    kwargs = dict(cfg.model_args or {})
    for key in ("img_size", "mask_ratio", "norm_pix_loss"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.drop_path:
        kwargs["drop_path"] = cfg.drop_path
    return create_method(cfg.model, **kwargs)


def autocast_context(precision: str, device: torch.device, cpu_autocast: bool = False):
    if precision == "fp32" or (device.type == "cpu" and not cpu_autocast):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.stop_requested = False
        self.extra_summary: dict = {}
        self.last_checkpoint: Path | None = None
        self.keep_after_save: list[str] = []

    # -- set-up -----------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        self.dist = d = init_distributed()
        self.out = Path(cfg.output)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if d.distributed:
            torch.distributed.barrier()
        self.log = setup_logging(self.out, d.is_main, d.rank)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        images = self.training_images()
        if cfg.compute_mean_std:
            mean, std = compute_mean_std(images.paths, max_images=1000, seed=cfg.seed)
            cfg.mean, cfg.std = list(mean), list(std)
            self.log.info("dataset mean %s std %s", cfg.mean, cfg.std)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(d.device)
        cfg.img_size = self.model.img_size
        self.dataset = self.build_dataset(images)
        self.sampler = ResumableSampler(self.dataset, d.world_size, d.rank, cfg.seed)
        workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers(d.device, d.local_world_size)
        self.num_workers = workers
        batches = len(self.sampler.inner) // cfg.batch_size
        if batches < 1:
            raise DataError(f"{cfg.data}: {len(images)} images give {len(self.sampler.inner)} per process, fewer "
                            f"than one batch of {cfg.batch_size}. Lower --batch-size (or use fewer processes).")
        self.steps_per_epoch = batches // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--accum-steps {cfg.accum_steps} is larger than the {batches} batches of one epoch; "
                              "lower --accum-steps or --batch-size")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        eff_batch = cfg.batch_size * cfg.accum_steps * d.world_size
        self.lr = absolute_lr(cfg.blr, eff_batch, self.model.lr_base_batch, cfg.lr)
        betas = cfg.betas or self.model.betas
        self.grad_clip = cfg.grad_clip if cfg.grad_clip is not None else self.model.default_grad_clip
        self.optimizer = build_optimizer(self.model.param_groups(cfg.weight_decay), self.lr, betas, d.device)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         round(cfg.warmup_epochs * self.steps_per_epoch), cfg.min_lr)
        fp16 = cfg.precision == "fp16" and d.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=fp16)
        self.fp16 = fp16

        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        if not self._resume():
            torch.manual_seed(cfg.seed + 1000 * d.rank)  # masks and augmentation differ across ranks

        self.train_model = self.model
        if d.distributed:
            self.train_model = DistributedDataParallel(self.model, device_ids=[d.local_rank]
                                                       if d.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if d.is_main:
            save_yaml(cfg.to_dict(), self.out / "config.yaml")
            info = self.model.describe()
            effective = cfg.precision
            if d.device.type == "cpu" and cfg.precision != "fp32":
                effective = "bf16 autocast" if cfg.cpu_autocast else f"fp32 ({cfg.precision} autocast is GPU-only " \
                                                                      "unless --cpu-autocast)"
            self.log.info("mimkit %s | %s | %.2fM encoder / %.2fM total params | %d images | %d step(s)/epoch | "
                          "effective batch %d | lr %.3g | %s on %s x%d | workers %d", mimkit.__version__,
                          cfg.model, info["encoder_params"] / 1e6, info["total_params"] / 1e6, len(self.dataset),
                          self.steps_per_epoch, eff_batch, self.lr, effective, d.device.type, d.world_size,
                          workers)

    # -- what a task provides (pretraining here; fine-tuning overrides these three) ------------------------------
    def training_images(self):
        return find_images(self.cfg.data)

    def build_model(self):
        return build_model(self.cfg)

    def build_dataset(self, images):
        cfg = self.cfg
        return ImageDataset(images, pretrain_transform(cfg.img_size, cfg.mean, cfg.std, cfg.crop_scale,
                                                       hflip=cfg.hflip), cfg.min_image_size)

    def after_epoch(self, record) -> None:
        """Called on every rank at the end of each epoch, before its checkpoint; ``record(dict)`` logs metrics and
        names appended to ``self.keep_after_save`` (e.g. "best.pt") become permanent copies of that checkpoint."""

    def _resume(self):
        cfg = self.cfg
        found = None
        if cfg.resume == "auto":
            found = ckpt.latest_checkpoint(self.out)
        elif cfg.resume not in ("none", "", None):
            found = (Path(cfg.resume), ckpt.load_checkpoint(Path(cfg.resume)))
        if found is None:
            return False
        path, state = found
        if state.get("model_name") != cfg.model:
            raise ckpt.CheckpointError(f"{path}: checkpoint is for model '{state.get('model_name')}', this run "
                                       f"builds '{cfg.model}'. Use another --output or --resume none.")
        ckpt.load_weights(self.model, state["model"], path, cfg.model, hint=" Were the model options changed? Use "
                          "the same options, another --output, or --resume none.")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.extra_summary.update(state.get("extra", {}))
        self.last_checkpoint = path
        rng = state["rng"][self.dist.rank] if self.dist.rank < len(state["rng"]) else None
        if rng is not None:
            ckpt.restore_rng(rng)
        self.log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)
        return True

    # -- checkpointing ----------------------------------------------------------------------------------------
    def save(self, reason: str):
        rngs = gather_objects(ckpt.capture_rng())
        skipped = gather_objects(sorted(self.skipped.items()))
        if not self.dist.is_main:
            return
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.fp16 else {}, "epoch": self.epoch, "step": self.step,
            "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "model_name": self.cfg.model,
            "config": self.cfg.to_dict(), "mimkit_version": mimkit.__version__, "extra": dict(self.extra_summary),
        }
        path = ckpt.checkpoint_path(self.out, self.step)
        ckpt.atomic_save(state, path)
        self.last_checkpoint = path
        if self.cfg.keep_epochs_every and self.epoch % self.cfg.keep_epochs_every == 0 and self.batch_in_epoch == 0:
            ckpt.keep_copy(path, self.out / f"epoch-{self.epoch:04d}.pt")
        ckpt.rotate(self.out, self.cfg.keep_last)
        merged = dict(kv for rank_items in skipped for kv in rank_items)
        if merged:
            (self.out / "skipped_images.tsv").write_text("".join(f"{p}\t{r}\n" for p, r in sorted(merged.items())))
        self.last_save = time.time()
        self.log.info("saved %s (%s)", path.name, reason)

    # -- training ---------------------------------------------------------------------------------------------
    def _handle_signal(self, signum, frame):
        self.stop_requested = True

    def run(self) -> dict:
        self._setup()
        cfg, d = self.cfg, self.dist
        self.skipped: dict[str, str] = {}
        self.last_save = time.time()
        start_time = time.time()
        start_step = self.step
        old_handler = signal.signal(signal.SIGTERM, self._handle_signal) if d.is_main else None
        rec = RunRecorder(self.out, d.is_main, cfg.tensorboard, cfg.progress, self.total_steps, self.step)
        nonfinite_in_a_row = 0
        images_seen, window_loss, window_n, window_t0 = 0, 0.0, 0, time.time()
        window_extra, window_steps = {}, 0  # scalars a method reports in outputs["log"], averaged per logged window
        last_loss = float("nan")
        self.scheduler.step_update(self.step)
        stop = self.step >= self.total_steps or (cfg.max_steps is not None and self.step >= cfg.max_steps)
        try:
            while not stop and self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * cfg.batch_size)
                loader = build_loader(self.dataset, cfg.batch_size, self.num_workers, self.sampler, d.device,
                                      cfg.seed * 100003 + self.epoch)
                rec.describe(f"epoch {self.epoch + 1}/{cfg.epochs}")
                self.model.train()
                micro, loss_sum = 0, torch.zeros((), device=d.device)
                usable = (len(self.sampler.inner) // cfg.batch_size) // cfg.accum_steps * cfg.accum_steps
                for batch in loader:
                    if self.batch_in_epoch >= usable:
                        break
                    for path, reason in batch.pop("skipped"):
                        if path not in self.skipped:
                            self.skipped[path] = reason
                            self.log.warning("skipped unreadable image %s: %s (%d so far)", path, reason,
                                             len(self.skipped))
                    batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                    batch["epoch"] = self.epoch  # how many times each sample has been visited before
                    micro += 1
                    self.batch_in_epoch += 1
                    last_micro = micro == cfg.accum_steps
                    sync = contextlib.nullcontext() if (last_micro or not d.distributed) else self.train_model.no_sync()
                    with sync:
                        with autocast_context(cfg.precision, d.device, cfg.cpu_autocast):
                            loss, outputs = self.train_model(batch)
                        self.scaler.scale(loss / cfg.accum_steps).backward()
                    loss_sum += loss.detach().float()
                    for key, value in (outputs.get("log") or {}).items() if isinstance(outputs, dict) else ():
                        window_extra[key] = window_extra.get(key, 0.0) + value.detach().float() / cfg.accum_steps
                    images_seen += batch["image"].shape[0]
                    if not last_micro:
                        continue
                    micro = 0
                    window_steps += 1
                    self.scaler.unscale_(self.optimizer)
                    params = [p for p in self.model.parameters() if p.grad is not None]
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
                    ok = torch.isfinite(loss_sum) if self.fp16 else torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
                    ok = all_reduce_(ok.float().reshape(1), torch.distributed.ReduceOp.MIN if d.distributed
                                     else None).item() > 0
                    step_loss = loss_sum.item() / cfg.accum_steps
                    loss_sum.zero_()
                    if ok:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        if hasattr(self.model, "after_optimizer_step"):
                            self.model.after_optimizer_step()
                        nonfinite_in_a_row = 0
                        self.step += 1
                        last_loss = step_loss
                        window_loss += step_loss
                        window_n += 1
                    else:
                        nonfinite_in_a_row += 1
                        if self.fp16:
                            self.scaler.update()
                        self.log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped "
                                         "(%d in a row, limit %d)", self.step + 1, step_loss, float(grad_norm),
                                         nonfinite_in_a_row, cfg.max_nonfinite)
                        if nonfinite_in_a_row >= cfg.max_nonfinite:
                            raise TrainingDiverged(
                                f"{nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient; stopping. "
                                "The last checkpoint is intact: lower --blr, use --precision bf16 or fp32, or set "
                                "--grad-clip, then rerun with --resume auto.")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step_update(self.step)
                    lr = self.optimizer.param_groups[0]["lr"]
                    rec.step(1 if ok else 0, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                    if ok and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        elapsed = time.time() - window_t0
                        ips = images_seen * d.world_size / max(elapsed, 1e-9)
                        rec.step(0, loss=f"{window_loss / max(window_n, 1):.4f}", lr=f"{lr:.2e}",
                                 img_s=f"{ips:.1f}")
                        extra = {k: float(v) / max(window_steps, 1) for k, v in window_extra.items()}
                        rec.log({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                                 "loss": window_loss / max(window_n, 1), "lr": lr, "grad_norm": float(grad_norm),
                                 "images_per_s": ips, "skipped_images": len(self.skipped), **extra}, self.step)
                        images_seen, window_loss, window_n, window_t0 = 0, 0.0, 0, time.time()
                        window_extra, window_steps = {}, 0
                    out_of_time = cfg.time_limit_min is not None and time.time() - start_time > cfg.time_limit_min * 60
                    at_max = cfg.max_steps is not None and self.step >= cfg.max_steps
                    periodic = time.time() - self.last_save > cfg.save_every_minutes * 60
                    if broadcast_flag(self.stop_requested or out_of_time or at_max or periodic, d.device):
                        self.save("time" if periodic else "stop")
                        if self.stop_requested or out_of_time or at_max:
                            stop = True
                            break
                if stop:
                    break
                self.epoch += 1
                self.batch_in_epoch = 0
                rec.log({"step": self.step, "epoch_done": self.epoch, "last_loss": last_loss}, self.step)
                self.keep_after_save = []
                self.after_epoch(lambda values: rec.log({"step": self.step, "epoch_done": self.epoch, **values},
                                                        self.step))
                if self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs or self.keep_after_save:
                    self.save(f"epoch {self.epoch}")
                    if d.is_main:
                        for name in self.keep_after_save:
                            ckpt.keep_copy(self.last_checkpoint, self.out / name)
        finally:
            self.train_model = self.model  # release the DDP wrapper while the process group still exists
            rec.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        wall = time.time() - start_time
        summary = {"model": cfg.model, "steps": self.step, "epochs_done": self.epoch, "final_loss": last_loss,
                   "train_steps_this_run": self.step - start_step, "wall_time_s": round(wall, 1),
                   "skipped_images": len(self.skipped), "output": str(self.out), **self.extra_summary}
        if d.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log.info("done: %s", json.dumps(summary))
        return summary


def pretrain(cfg: PretrainConfig) -> dict:
    try:
        return Trainer(cfg).run()
    finally:
        cleanup()
