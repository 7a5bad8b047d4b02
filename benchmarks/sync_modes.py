"""The synchronisation modes the accuracy benchmarks compare, as `--set` options of
`hvd-yolo train` / `hvd-yolo demo`, by the name their results are stored under.

PowerSGD starts at the end of the demo's 30-step LR warm-up, as torch's hook advises; the
warm-up averages whole gradients in fp16 (the default) or in fp32, as torch's hook sends them.
"""

from __future__ import annotations

SYNC_MODES: dict[str, list[str]] = {
    "fp32": ["dist.compression=none"],
    "fp16": ["dist.compression=fp16"],
    "powersgd_r1": ["dist.compression=powersgd", "dist.powersgd_rank=1",
                    "dist.powersgd_start_step=30"],
    "powersgd_r4": ["dist.compression=powersgd", "dist.powersgd_rank=4",
                    "dist.powersgd_start_step=30"],
    "powersgd_r4_fp32_warmup": ["dist.compression=powersgd", "dist.powersgd_rank=4",
                                "dist.powersgd_start_step=30",
                                "dist.powersgd_warmup_compression=none"],
    "local_k4": ["dist.sync=local", "dist.local_steps=4"],
    "local_k16": ["dist.sync=local", "dist.local_steps=16"],
    "local_k4_overlap": ["dist.sync=local", "dist.local_steps=4", "dist.local_overlap=true"],
}
