"""A training process for the kill test: stalls in the middle of a round so the test can SIGKILL it."""

import sys
import time
from pathlib import Path

from lightning import Callback
from test_resume import run


class StallMidRound(Callback):
    def __init__(self, at_round: int, marker: Path) -> None:
        self.at_round, self.marker = at_round, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.at_round and batch_idx == 1:
            self.marker.write_text("mid-round")
            time.sleep(600)  # killed here


if __name__ == "__main__":
    checkpoint_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
    run(checkpoint_dir, staleness=1, callbacks=[StallMidRound(at_round=3, marker=marker)])
