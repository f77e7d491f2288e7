"""Worker for the multi-process tests: train a tiny text model with APTTrainer and save the
final parameters of this rank. Launched by tests/test_ddp.py through torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/ddp_worker.py OUT METHOD BS
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_trainer import TextTasks, apt_args, text_model  # noqa: E402

from apt_hf import APTTrainer  # noqa: E402


def main() -> None:
    out, method, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from pathlib import Path

    model = text_model()
    args = apt_args(
        Path(out),
        mtl_method=method,
        max_steps=3,
        per_device_train_batch_size=batch_size,
        apt_optimizer="muon",
        muon_ns_dtype="float32",  # bf16 NS would amplify reduction-order rounding
    )
    trainer = APTTrainer(model=model, args=args, train_dataset=TextTasks(n=8))
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    torch.save(
        {n: p.detach().cpu() for n, p in model.named_parameters()},
        os.path.join(out, f"params_rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
