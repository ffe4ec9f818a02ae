"""What the strategy and callback do per step stays small: turn and round work is done per turn or round."""

from helpers import quiet_trainer
from lightning import Callback
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback


class ProgressBarMetrics(Callback):
    """What a progress bar would show after every step (it reads ``trainer.progress_bar_metrics``)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(dict(trainer.progress_bar_metrics))


def test_progress_bar_names_round_client_and_block_as_integers_without_logging_them_per_step():
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=2, seed=1)
    bar = ProgressBarMetrics()
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1), bar], max_epochs=3)
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))

    expected = [
        {"round": str(t), "client": str(turn.client), "block": str(strategy.plan.block_of(t))}
        for t in range(3)
        for turn in strategy.batch_sampler.plan(t)
        for _ in turn.batches
    ]
    shown = [{key: metrics[key] for key in ("round", "client", "block")} for metrics in bar.seen]
    assert shown == expected
    # integers as text: the rich progress bar prints every number with three decimals
    assert all(value.isdigit() for metrics in shown for value in metrics.values())
    # nothing of the turn goes through self.log on every step (each call costs a collection update)
    assert not {"round", "client", "block"} & set(trainer.callback_metrics)
    assert not {"round", "client", "block"} & set(trainer.logged_metrics)
