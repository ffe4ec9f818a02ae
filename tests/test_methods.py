"""Every method of the paper's Table 1 on a tiny Llama: trains, moves what it should, counts what it sends."""

from collections.abc import Callable

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import AutoModelForCausalLM

from lightning_parablock import CausalLMModule, ParaBlockCallback
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.cli import main
from lightning_parablock.core.lora import lora_pairs
from lightning_parablock.core.planning import cyclic_turn
from lightning_parablock.data import SyntheticArithmeticDataModule
from lightning_parablock.methods.registry import METHODS, method
from lightning_parablock.strategies.fedcybgd import FedCyBGDStrategy
from lightning_parablock.strategies.flora import stacked_products
from lightning_parablock.telemetry.report import compare, report
from lightning_parablock.telemetry.timeline import TIMELINE_FILENAME, load_timeline, save_timeline

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
CLIENTS = 2


def _fit(name, config, cycles=3, spy=None, **strategy_args):
    spec = method(name)
    module = CausalLMModule(config=config, learning_rate=1e-2, seed=0, **spec.module_args(LORA))
    data = SyntheticArithmeticDataModule(num_examples=64, val_examples=16, batch_size=8, partition="dirichlet", seed=0)
    strategy = spec.strategy(num_clients=CLIENTS, local_steps=2, include_embeddings=True, seed=0, **strategy_args)
    if spy is not None:
        spy(strategy)
    callback = ParaBlockCallback.for_method(spec)
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=spec.rounds(cycles, CLIENTS))
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    return module, strategy, callback, initial, before, after


def _changed(module, initial):
    return {n for n, p in module.named_parameters() if not torch.equal(p, initial[n])}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_lowers_the_loss_and_counts_the_bytes_it_sends(name, tiny_llama_config):
    module, strategy, callback, initial, before, after = _fit(name, tiny_llama_config)
    assert after < before
    model_params = dict(module.named_parameters())
    trained = {r.round: r for r in callback.records if not r.flush}
    assert all(set(r.compute_seconds) == set(r.participants) for r in trained.values())
    exchanges = [r for r in callback.records if r.exchanged_round is not None]
    assert sorted(r.exchanged_round for r in exchanges) == sorted(trained)  # every round's deltas crossed once
    for record in exchanges:
        origin = trained[record.exchanged_round]
        names = [n for n in strategy.partition[origin.block].param_names if n in strategy.turns.trainable]
        sent = 4 * sum(model_params[n].numel() for n in names)  # fp32 deltas of the trained parameters
        assert record.upload_bytes == {c: sent for c in origin.participants}
        assert record.download_bytes == (sent * len(origin.participants) if name == "flora" else sent)  # FLoRA: stacks


@pytest.mark.parametrize("name", ["fedit", "ffa_lora"])
def test_lora_methods_move_only_adapters(name, tiny_llama_config):
    module, _, _, initial, _, _ = _fit(name, tiny_llama_config, cycles=2)
    changed = _changed(module, initial)
    assert changed and all(".lora_" in n for n in changed)  # base weights bit-identical
    if name == "ffa_lora":
        assert all(".lora_B." in n for n in changed)  # A never moves


def test_flora_aggregate_is_the_weighted_sum_of_the_clients_products():
    generator = torch.Generator().manual_seed(0)
    a0 = torch.randn(3, 5, generator=generator)
    deltas = {
        c: {"x.lora_A.default.weight": torch.randn(3, 5, generator=generator),
            "x.lora_B.default.weight": torch.randn(4, 3, generator=generator)}
        for c in (0, 1, 2)
    }  # fmt: skip
    weights = {0: 0.5, 1: 0.3, 2: 0.2}
    stacked = StackingAggregator()(deltas, weights).aggregate
    assert stacked["x.lora_B.default.weight"].shape == (4, 9) and stacked["x.lora_A.default.weight"].shape == (9, 5)
    a, b = "x.lora_A.default.weight", "x.lora_B.default.weight"
    products = stacked_products(stacked, {a: a0}, [("x.w", a, b)])
    expected = sum(w * deltas[c][b] @ (a0 + deltas[c][a]) for c, w in weights.items())
    torch.testing.assert_close(products["x.w"], expected)
    mean = MeanAggregator()(deltas, weights).aggregate  # what FedIT does instead: not the mean of the products
    naive = mean["x.lora_B.default.weight"] @ (a0 + mean["x.lora_A.default.weight"])
    assert not torch.allclose(naive, expected)


def record_aggregates(seen: list) -> Callable:
    """A spy for ``_fit``: per aggregate, the round's deltas and weights and the parameters before and after."""

    def spy(strategy) -> None:
        build = strategy.make_client_exchange

        def new_exchange(*args, **kwargs):
            exchange = build(*args, **kwargs)
            apply = exchange.apply_aggregate

            def recording(round_index, aggregate, left_out=()):
                params = {n: p.detach().clone() for n, p in strategy.lightning_module.named_parameters()}
                deltas = strategy.federation.round_deltas(round_index)
                weights = exchange.spec.aggregator.client_weights(strategy.federation.sample_counts(list(deltas)))
                seen.append((deltas, weights, params))
                apply(round_index, aggregate, left_out)
                seen[-1] += ({n: p.detach().clone() for n, p in strategy.lightning_module.named_parameters()},)

            exchange.apply_aggregate = recording
            return exchange

        strategy.make_client_exchange = new_exchange

    return spy


def test_flora_merges_the_stacked_product_into_the_base_and_restarts_the_adapters(tiny_llama_config):
    seen: list = []
    spy = record_aggregates(seen)
    module, _, _, _, _, _ = _fit("flora", tiny_llama_config, cycles=2, spy=spy)
    assert len(seen) == 2
    for deltas, weights, before, after in seen:
        total = sum(weights.values())  # round_weights are unnormalized: the transport normalizes over senders
        for pair in lora_pairs(module):
            expected = sum(
                w / total * deltas[c][pair.b] @ (before[pair.a] + deltas[c][pair.a]) for c, w in weights.items()
            ) * pair.scaling
            torch.testing.assert_close(after[pair.base] - before[pair.base], expected, rtol=1e-5, atol=1e-6)
            assert not after[pair.b].any() and not torch.equal(after[pair.a], before[pair.a])


def test_flora_stacks_clients_of_different_ranks_into_the_sum_of_their_products():
    generator = torch.Generator().manual_seed(1)
    a, b = "x.lora_A.default.weight", "x.lora_B.default.weight"
    a0 = torch.randn(4, 5, generator=generator)  # the module's rank r_max = 4
    ranks = {0: 4, 1: 1, 2: 3}
    deltas = {
        c: {a: torch.randn(r, 5, generator=generator), b: torch.randn(6, r, generator=generator)}
        for c, r in ranks.items()
    }  # fmt: skip
    weights = {0: 0.2, 1: 0.5, 2: 0.3}
    stacked = StackingAggregator()(deltas, weights).aggregate
    assert stacked[a].shape == (8, 5) and stacked[b].shape == (6, 8)  # Σ r_i = 8
    products = stacked_products(stacked, {a: a0}, [("x.w", a, b)], ranks=list(ranks.values()))
    expected = sum(w * deltas[c][b] @ (a0[: ranks[c]] + deltas[c][a]) for c, w in weights.items())
    torch.testing.assert_close(products["x.w"], expected)


def test_flora_with_client_ranks_trains_each_clients_own_components_and_sends_rank_sized_adapters(tiny_llama_config):
    ranks = [2, 4]  # LORA's r = 4 is r_max
    seen: list = []
    spy = record_aggregates(seen)
    module, strategy, callback, _, before, after = _fit("flora", tiny_llama_config, cycles=2, spy=spy, client_ranks=ranks)
    assert after < before
    pairs = list(lora_pairs(module))
    for deltas, weights, params_before, params_after in seen:
        for pair in pairs:
            assert deltas[1][pair.a][2:].any()  # the rank-4 client moves every component
            assert not deltas[0][pair.a][2:].any() and not deltas[0][pair.b][:, 2:].any()  # rank 2: only its own
        total = sum(weights.values())
        for pair in pairs:
            expected = sum(
                w / total * deltas[c][pair.b][:, : ranks[c]] @ (params_before[pair.a] + deltas[c][pair.a])[: ranks[c]]
                for c, w in weights.items()
            ) * pair.scaling  # one scale, alpha / r_max, for every client
            torch.testing.assert_close(params_after[pair.base] - params_before[pair.base], expected, rtol=1e-5, atol=1e-6)
    sizes = {c: sum(4 * r * (p.layer.lora_A["default"].weight.shape[1] + p.layer.lora_B["default"].weight.shape[0])
                    for p in pairs) for c, r in enumerate(ranks)}  # fmt: skip
    for record in (r for r in callback.records if r.exchanged_round is not None):
        assert record.upload_bytes == sizes and record.download_bytes == sum(sizes.values())
    assert not [name for name, p in module.named_parameters() if p._backward_hooks]  # the fit removed its gradient hooks


def test_flora_client_ranks_are_checked(tiny_llama_config):
    with pytest.raises(ValueError, match=r"`client_ranks` needs one rank per client \(num_clients=2\), got 3"):
        method("flora").strategy(num_clients=2, client_ranks=[1, 2, 3])
    with pytest.raises(ValueError, match=r"client_ranks\[1\]"):
        method("flora").strategy(num_clients=2, client_ranks=[1, 0])
    with pytest.raises(MisconfigurationException, match=r"`client_ranks\[1\]=8` is above the module's LoRA rank r=4"):
        _fit("flora", tiny_llama_config, cycles=1, client_ranks=[4, 8])


def test_the_timeline_names_the_method_and_an_older_one_without_it_still_reports(tiny_llama_config, tmp_path, capsys):
    _, _, callback, _, _, _ = _fit("ffa_lora", tiny_llama_config, cycles=1)
    meta, _ = load_timeline(callback._timeline_path)
    assert meta["method"] == "ffa_lora"
    runs = tmp_path / "runs"
    for version, method_name in (("version_0", "fedit"), ("version_1", None)):
        extra = {"method": method_name} if method_name else {}  # version_1 as written before methods were recorded
        save_timeline(runs / version / TIMELINE_FILENAME, callback.records, {**extra, "staleness": 0, "link": meta["link"]})
    table = compare(runs, ["50MB/s"])
    rows = table.splitlines()[2:]
    assert rows[0].startswith("fedit (version_0)") and rows[1].startswith("staleness 0 (version_1)")
    text, _ = report(runs, run="version_0")
    assert "method: fedit" in text
    main(["report", str(runs), "--compare", "--bandwidth", "50MB/s"])
    assert "fedit (version_0)" in capsys.readouterr().out


def test_fedcybgd_visits_clients_in_order_each_on_its_block_and_counts_the_fetch(tiny_llama_config):
    _, strategy, callback, _, _, _ = _fit("fedcybgd", tiny_llama_config, cycles=2)
    records = [r for r in callback.records if not r.flush]
    blocks = len(strategy.partition)
    assert [r.participants for r in records] == [[t % CLIENTS] for t in range(2 * CLIENTS)]
    assert [r.block for r in records] == [cyclic_turn(t, CLIENTS, blocks)[1] for t in range(2 * CLIENTS)]
    assert records[0].sync_download_bytes == {0: 0}  # the first client holds the initial model
    changed_before = {t: {r.block for r in records[max(0, t - CLIENTS + 1) : t]} for t in range(len(records))}
    for t, record in enumerate(records):
        fetched = sum(strategy.block_nbytes(b) for b in changed_before[t])
        assert record.sync_download_bytes == {t % CLIENTS: fetched}


@pytest.mark.parametrize(
    ("option", "value"), [("schedule", "sequential"), ("participation", 0.5), ("clients_per_round", 1)]
)
def test_fedcybgd_refuses_the_options_its_cycle_ignores(option, value):
    with pytest.raises(ValueError, match=rf"FedCyBGD trains one client per round, on block `client mod B`: `{option}`"):
        FedCyBGDStrategy(num_clients=CLIENTS, **{option: value})
    FedCyBGDStrategy(CLIENTS, schedule="random", participation=1.0, clients_per_round=None)  # the defaults pass


def test_lora_module_saves_a_plain_merged_model(tiny_llama_config, tmp_path):
    module = CausalLMModule(config=tiny_llama_config, seed=0, lora=LORA)
    with torch.no_grad():
        for pair in lora_pairs(module):
            pair.layer.lora_B["default"].weight.normal_()
    module.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 12]])
    module.eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_unknown_method_and_lora_option_are_refused(tiny_llama_config):
    with pytest.raises(ValueError, match=r"`method` must be one of \('parablock'"):
        method("fedprox")
    with pytest.raises(ValueError, match=r"Unknown LoRA options \['rank'\]"):
        CausalLMModule(config=tiny_llama_config, lora={"rank": 4})


@pytest.mark.slow
def test_table1_benchmark_quick_mode_prints_every_method_and_draws_the_chart(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "table1.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for title in ("ParaBlock", "FedBCD", "Full FT", "FedIT", "FFA-LoRA", "FLoRA", "FedCyBGD"):
        assert re.search(rf"^{re.escape(title)} +[0-9.]+ ", result.stdout, re.MULTILINE), title
    assert "ParaBlock's final val loss vs FedBCD's" in result.stdout
    assert (tmp_path / "table1_figure2.png").stat().st_size > 0 and (tmp_path / "table1.json").exists()
