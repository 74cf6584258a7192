"""The real ``mimkit`` command line with faults switched on by environment variables (tests/faults only).

FAULT_STEP_SLEEP=s       sleep s seconds in every forward (gives a test time to send a signal or kill -9)
FAULT_NAN_FROM=k         the loss is NaN from the k-th forward call on (a diverging run)
FAULT_SPIKE_AT=k,...     the loss is multiplied by 1000 at these forward calls
FAULT_EXPLODE_AT=k       after the k-th optimizer step every weight is multiplied by 1e6 (finite, poisoned)
FAULT_KILL_IN_SAVE=k     the k-th checkpoint write is cut in the middle by SIGKILL
FAULT_DISK_FULL_AT=k     the k-th checkpoint write fails half-way with ENOSPC (a full disk)
(for a sharded checkpoint, --checkpoint-format sharded: the k-th DCP save is cut after its data file is half written)
Model ``fault_mae_pico``: MAE ViT-Pico/8 at 32 px with a 1-block decoder, with these faults.
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mimkit.cli import main
from mimkit.methods.mae import MAE
from mimkit.methods.registry import register_preset


def _env_int(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


class FaultyMAE(MAE):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.steps = 0, 0

    def forward(self, batch):
        loss, out = super().forward(batch)
        self.calls += 1
        time.sleep(float(os.environ.get("FAULT_STEP_SLEEP", "0") or 0))
        nan_from = _env_int("FAULT_NAN_FROM")
        if nan_from and self.calls >= nan_from:
            loss = loss * float("nan")
        if str(self.calls) in os.environ.get("FAULT_SPIKE_AT", "").split(","):
            loss = loss * 1000
        return loss, out

    def after_optimizer_step(self):
        super().after_optimizer_step()
        self.steps += 1
        if self.steps == _env_int("FAULT_EXPLODE_AT"):
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(1e6)


register_preset(
    "fault_mae_pico",
    FaultyMAE,
    "fault injection (tests only)",
    encoder="vit_pico_patch8_64",
    img_size=32,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
)

_kill_at, _full_at = _env_int("FAULT_KILL_IN_SAVE"), _env_int("FAULT_DISK_FULL_AT")
if _kill_at or _full_at:
    _real_save, _count = torch.save, [0]

    def _save(obj, f, *args, **kwargs):
        if ".checkpoint-" not in str(getattr(f, "name", "")):  # not a checkpoint (e.g. all_gather_object's pickles)
            return _real_save(obj, f, *args, **kwargs)
        _count[0] += 1
        if _count[0] in (_kill_at, _full_at):
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            if _count[0] == _kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_save(obj, f, *args, **kwargs)

    torch.save = _save

    import torch.distributed.checkpoint as dcp

    _real_dcp_save, _dcp_count = dcp.save, [0]

    def _dcp_save(state, *, checkpoint_id=None, **kwargs):
        _dcp_count[0] += 1
        result = _real_dcp_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if _dcp_count[0] in (_kill_at, _full_at):
            for data in sorted(Path(checkpoint_id).glob("*.distcp")):  # half of each data file reached the disk
                data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
            if _dcp_count[0] == _kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return result

    dcp.save = _dcp_save

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
