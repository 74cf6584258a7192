"""Run outputs: a JSON-lines metrics file, TensorBoard scalars and a progress bar (rank 0 only)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class TqdmLoggingHandler(logging.Handler):
    """Log records printed through tqdm so they do not break the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(output: Path | None, is_main: bool, rank: int = 0) -> logging.Logger:
    log = logging.getLogger("mimkit")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    prefix = "" if is_main else f"[rank {rank}] "
    console = TqdmLoggingHandler()
    console.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    log.addHandler(console)
    if output is not None and is_main:
        fh = logging.FileHandler(Path(output) / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    return log


class RunRecorder:
    def __init__(self, output: Path, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.metrics_file = None
        if not enabled:
            return
        self.metrics_file = open(Path(output) / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr, mininterval=0.5)

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
