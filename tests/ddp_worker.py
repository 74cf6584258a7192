"""Run by test_trainer.py under torchrun (2 processes, gloo): trains, then checks the replicas are identical."""

import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from mimkit.pretraining import PretrainTrainer as Trainer  # noqa: E402

from conftest import pico_config  # noqa: E402


def main(data, out, model="mae_vit_pico_patch8"):
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints stacks instead of blocking CI
    trainer = Trainer(pico_config(data, Path(out) / "run", epochs=1, batch_size=4, model=model))
    summary = trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
        Path(out, "ddp_result.json").write_text(
            json.dumps(
                {
                    "world_size": dist.get_world_size(),
                    "identical": identical,
                    "steps": summary["steps"],
                    "effective_batch": 4 * dist.get_world_size(),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
