"""One plain line per round for logs that are not a terminal (CI, ``nohup``, SLURM).

A progress bar draws nothing useful into a file; without this, such a log stays silent until the run ends.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from lightning_parablock.telemetry.timeline import RoundRecord


def format_round_line(record: RoundRecord, rounds: Optional[int] = None) -> str:
    """``round 3/60  block 2  loss 1.2345  compute 0.52s  exposed wait 0.010s  round 0.60s``."""
    of = f"/{rounds}" if rounds else ""
    loss = f"  loss {record.mean_client_loss:.4f}" if record.client_loss else ""
    return (
        f"[parablock] round {record.round + 1}{of}  block {record.block}{loss}"
        f"  compute {record.process_compute_seconds:.2f}s  exposed wait {record.exposed_wait_seconds:.3f}s"
        f"  round {record.wall_seconds:.2f}s"
    )


def print_round_line(trainer: Any, record: RoundRecord, stream: Optional[TextIO] = None) -> None:
    """Print the round's line on rank 0 unless a progress bar is drawing on a terminal."""
    stream = stream or sys.stdout
    if not trainer.is_global_zero:
        return
    if trainer.progress_bar_callback is not None and stream.isatty():
        return
    rounds = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    print(format_round_line(record, rounds), file=stream, flush=True)
