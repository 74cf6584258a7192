"""Run outputs: a JSON-lines metrics file, TensorBoard scalars and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm


class TqdmLoggingHandler(logging.Handler):
    """Log records printed through tqdm so they do not break the progress bar."""

    def emit(self, record):
        """Write the record through tqdm, so that progress bars stay intact."""
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, leaving out a line that is not one whole record (a line cut by kill -9 or a
    full disk in the middle of a write)."""
    return [row for row in map(_record, Path(path).read_text().splitlines()) if row is not None]


def _record(line: str) -> dict | None:
    """One metrics.jsonl line as its record, or None for a line that is not one whole record."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _csv_step(line: str) -> int | None:
    """The step of one metrics.csv row (time,step,key,value), or None for the header or a cut row."""
    parts = line.split(",")
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


class _AppendLines:
    """A text file of lines appended by a long run: a write the disk refuses (full, quota) is a warning, once until
    a write succeeds again, not the run's end (its next checkpoint decides that, exit 5 if it cannot be written); a
    line left cut by a failed write or a kill is closed before the next one, so each later line stays whole."""

    def __init__(self, path: Path):
        self.path = path
        self.file: IO[str] = open(path, "a")
        self.cut = path.stat().st_size > 0 and not _ends_with_newline(path)
        self.failing = False

    def write(self, text: str) -> None:
        try:
            self.file.write(("\n" if self.cut else "") + text)
            self.file.flush()
        except OSError as err:
            self.cut = True
            if not self.failing:
                logging.getLogger("mimkit").warning(
                    "%s: not written (%s); training goes on, the next checkpoint stops the run (exit 5) if it cannot "
                    "be written either",
                    self.path.name,
                    err.strerror or err,
                )
            self.failing = True
            return
        self.cut = self.failing = False

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the buffered tail of a full disk: already reported
            pass


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


class _LogFile(logging.FileHandler):
    """train.log: a record the disk refuses (full) is one line on the console for the run, not logging's traceback
    block for every record after it; the console keeps every record."""

    reported = False

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        if not self.reported:
            self.reported = True
            tqdm.write(f"{self.baseFilename}: not written ({err.strerror or err}); the console has the log", sys.stderr)


def setup_logging(output: Path | None, is_main: bool, rank: int = 0) -> logging.Logger:
    """The run's logger: console on the main rank, ``train.log`` in ``output`` for every rank."""
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
        fh = _LogFile(Path(output) / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    return log


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records after ``step`` (written by a run that was then interrupted) from metrics.jsonl, and the rows
    after it from metrics.csv beside it where there is one, so that after a resume every step appears once in each;
    lines cut by a kill go too. Returns how many records were dropped from metrics.jsonl."""
    path = Path(path)

    def jsonl_keeps(line: str) -> bool:
        row = _record(line)
        return row is not None and row.get("step", 0) <= step

    def csv_keeps(line: str) -> bool:
        row_step = _csv_step(line)
        return line == CSV_HEADER if row_step is None else row_step <= step

    _drop_lines(path.with_suffix(".csv"), csv_keeps)
    return _drop_lines(path, jsonl_keeps)


CSV_HEADER = "time,step,key,value"


def _drop_lines(path: Path, keeps) -> int:
    """Rewrite ``path`` (atomically) without the lines ``keeps`` refuses; how many went."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if keeps(line)]
    if len(kept) < len(lines):
        _replace_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a kill leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


LOGGERS = ("csv", "wandb", "mlflow")
TRACKING_IDS = "tracking.json"  # the wandb and mlflow run ids of a run folder, so that a resume continues them


def _tracking_ids(output: Path) -> dict:
    try:
        ids = json.loads((Path(output) / TRACKING_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str) and v} if isinstance(ids, dict) else {}


def _write_tracking_ids(output: Path, ids: dict) -> None:
    path = Path(output) / TRACKING_IDS
    try:
        _replace_text(path, json.dumps(ids) + "\n")
    except OSError as err:  # a full disk: the next resume starts new tracking runs, training goes on
        logging.getLogger("mimkit").warning("%s: not written (%s)", path, err.strerror or err)


class RunRecorder:
    """Rank 0's outputs: metrics.jsonl (always), TensorBoard, the progress bar, and the extra ``loggers``: csv
    (``metrics.csv``, one row per value: time, step, key, value), wandb and mlflow (both optional installs; wandb
    follows ``WANDB_MODE``, e.g. offline; mlflow logs to the file store ``DIR/mlruns`` unless
    ``MLFLOW_TRACKING_URI`` is set)."""

    def __init__(
        self,
        output: Path,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
        loggers: tuple[str, ...] = (),
        config: dict | None = None,
        progress_start: int | None = None,
    ):
        """``start_step``: the step counter the run resumes at (TensorBoard drops the events past it);
        ``progress_start``: where the progress bar of ``total_steps`` starts (default ``start_step``; after a resume
        in another layout the two differ, ``Trainer.position``)."""
        self.enabled = enabled
        self.writer: Any = None
        self.bar: Any = None
        self.metrics_file: _AppendLines | None = None
        self.csv: _AppendLines | None = None
        self.wandb: Any = None
        self.mlflow: Any = None
        if not enabled:
            return
        output = Path(output)
        self.metrics_file = _AppendLines(output / "metrics.jsonl")
        if "csv" in loggers:
            new = not (output / "metrics.csv").is_file()
            self.csv = _AppendLines(output / "metrics.csv")
            if new:
                self.csv.write(CSV_HEADER + "\n")
        ids = _tracking_ids(output)
        known = dict(ids)
        if "wandb" in loggers:
            import wandb

            ids.setdefault("wandb", uuid.uuid4().hex[:12])  # a resume (a requeue) continues the same wandb run
            wandb.init(dir=str(output), config=config or {}, name=output.name, id=ids["wandb"], resume="allow")
            self.wandb = wandb
        if "mlflow" in loggers:
            ids["mlflow"] = self._start_mlflow(output, config, ids.get("mlflow"))
        if ids != known:
            _write_tracking_ids(output, ids)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resume step that an interrupted run wrote
            self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"), purge_step=start_step)
        if progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step if progress_start is None else progress_start,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.05,
                file=sys.stderr,
                mininterval=0.5,
            )

    def _start_mlflow(self, output: Path, config: dict | None, run_id: str | None) -> str:
        """Start the MLflow run of this run folder: the one an earlier attempt started (its id in tracking.json),
        else a new one with the options as its parameters; its id."""
        import os

        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local file store: offline, no server; MLflow 3 asks for an explicit opt-in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((output / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        if run_id:
            try:
                return mlflow.start_run(run_id=run_id).info.run_id
            except Exception as err:  # noqa: BLE001  (another tracking store, or the run was deleted)
                logging.getLogger("mimkit").warning(
                    "mlflow: cannot continue run %s of %s (%s); starting a new one",
                    run_id,
                    TRACKING_IDS,
                    str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__,
                )
        run = mlflow.start_run(run_name=output.name)
        mlflow.log_params({k: str(v)[:250] for k, v in (config or {}).items()})
        return run.info.run_id

    def step(self, n: int = 1, **postfix) -> None:
        """Advance the progress bar by ``n`` with ``postfix`` values."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def describe(self, text: str) -> None:
        """Set the progress bar's description."""
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)

    def log(self, record: dict, step: int) -> None:
        """Append ``record`` to metrics.jsonl and send its scalars to the loggers at ``step``."""
        if not self.enabled or self.metrics_file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.metrics_file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("time", "step")}
        if self.writer is not None:
            self._tensorboard(lambda w: [w.add_scalar(key, value, step) for key, value in scalars.items()])
        if self.csv is not None:
            self.csv.write("".join(f"{record['time']},{step},{k},{v}\n" for k, v in scalars.items()))
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG (e.g. the reconstruction grid) to TensorBoard, wandb and mlflow; the file itself stays in DIR."""
        if not self.enabled:
            return
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            pixels = np.asarray(Image.open(path).convert("RGB"))
            self._tensorboard(lambda w: w.add_image(tag, pixels, step, dataformats="HWC"))
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(str(path))}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path), artifact_path=tag)

    def _tensorboard(self, write) -> None:
        """``write(writer)``; TensorBoard's writer thread raises a failed write (a full disk) at the next call: then
        one warning, and no more TensorBoard events this run (metrics.jsonl keeps every value)."""
        try:
            write(self.writer)
        except OSError as err:
            logging.getLogger("mimkit").warning(
                "tensorboard: not written (%s); no more TensorBoard events this run, metrics.jsonl goes on",
                err.strerror or err,
            )
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # its thread holds the same failure
                pass

    def close(self) -> None:
        """Close the progress bar and every logger."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self._tensorboard(lambda w: w.close())
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.csv is not None:
            self.csv.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
