"""The server's rule for a round: the base class of every aggregator, and the non-finite policy applied first.

An aggregator turns a round's client deltas into Δ_t, in fp32. It is the only place a rule lives: the in-memory
transport calls it with every delta, a server process (Flower) with every site's clients' deltas, and the
torch.distributed transport asks :attr:`Aggregator.reduces_from_partial_sums` whether each rank may add its own
clients into a partial sum (:meth:`Aggregator.accumulate`, then one all-reduce) or whether every delta must be
gathered first. Either way the same object does the arithmetic, client by client in ascending id: the same deltas
give the same bits in memory, on a server and between ranks that gather; ranks that sum in parts add their own
clients first and then the ranks' sums, which agrees to fp32 rounding.

One class per rule (:mod:`.mean`, :mod:`.median`, :mod:`.trimmed_mean`, :mod:`.stacking`); a rule of one's own
subclasses :class:`Aggregator` and implements :meth:`Aggregator.combine`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, get_args

from torch import Tensor

from lightning_parablock.aggregation.nonfinite import NonFinitePolicy, kept_clients, non_finite_clients
from lightning_parablock.aggregation.rules import Deltas, check_deltas, zeros_like_delta
from lightning_parablock.argument_checks import check_choice, check_float

Weighting = Literal["uniform", "samples"]


@dataclass
class AggregateResult:
    aggregate: dict[str, Tensor]
    skipped_clients: list[int]  # non-finite deltas left out under the "skip" policy


class _BuildsTheRule(type):
    """``Aggregator(method=...)``, the one configurable class before 0.2, builds the rule's own class."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Aggregator:
            return _from_method(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Aggregator(metaclass=_BuildsTheRule):
    """How the server combines a round's client deltas (subclass it; use e.g. :class:`~.mean.MeanAggregator`).

    Every call combines the clients' deltas with their weights normalized over them and applies the non-finite
    policy (:mod:`~lightning_parablock.aggregation.nonfinite`): a rule that sums (:meth:`accumulate`) checks while
    it adds; any other checks every delta, then calls :meth:`combine` on the kept clients.

    Args:
        nonfinite: a client whose delta holds NaN/Inf makes the exchange fail (``"raise"``) or is left out of
            this round with a warning (``"skip"``); it never reaches the global model.
    """

    reduces_from_partial_sums: ClassVar[bool] = False
    """Whether Δ_t is the sum of per-rank :meth:`accumulate` results (one all-reduce), or needs every delta."""
    reads_payloads_as_sent: ClassVar[bool] = False
    """Whether :meth:`accumulate` and :meth:`sum_into` may get a delta as it crossed the wire (fp32, or bf16/fp16,
    which adding into an fp32 sum widens exactly) instead of decoded to fp32: saves an fp32 copy of every delta."""
    weighting: Weighting = "uniform"
    """Which weight a client's delta carries: 1 (``"uniform"``) or its sample count (``"samples"``)."""

    def __init_subclass__(cls, method: Optional[str] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:  # one of the rules ``Aggregator(method=...)`` used to name
            _RULE_OF_METHOD[method] = cls
        cls.__signature__ = _arguments_of(cls)  # help() and IDEs see the constructor, not the metaclass's call

    def __init__(
        self,
        method: Optional[str] = None,
        clip_norm: Optional[float] = None,
        trim_fraction: Optional[float] = None,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        """``method``, ``clip_norm`` and ``trim_fraction`` are read only by ``Aggregator(...)`` itself, the
        deprecated configurable form (also from a config's ``class_path: lightning_parablock.Aggregator``), which
        builds the rule's own class; a rule's class takes its own arguments."""
        given = {"method": method, "clip_norm": clip_norm, "trim_fraction": trim_fraction}
        legacy = {name: value for name, value in given.items() if value is not None}
        if legacy:
            raise TypeError(
                f"{type(self).__name__} got {legacy}: those are arguments of the deprecated `Aggregator(...)` only. A"
                " rule's class takes its own (e.g. `MedianAggregator(clip_norm=...)`); a rule of your own calls"
                " `super().__init__(nonfinite=...)` and implements `combine`."
            )
        self.nonfinite = check_choice("nonfinite", nonfinite, get_args(NonFinitePolicy))

    def client_weights(self, sample_counts: Mapping[int, int]) -> dict[int, float]:
        """Unnormalized weights of the senders whose sample counts are given."""
        if self.weighting == "samples":
            return {client: float(count) for client, count in sample_counts.items()}
        return {client: 1.0 for client in sample_counts}

    def check(self, deltas: Deltas) -> list[str]:
        """The tensor names every client sent; a ValueError when clients disagree on names or shapes."""
        return check_deltas(deltas)

    def __call__(
        self, deltas: Deltas, weights: Mapping[int, float], into: Optional[Mapping[str, Tensor]] = None
    ) -> AggregateResult:
        """Δ_t from every sender's delta and unnormalized weight; a rule that sums makes it in ``into`` when given
        (fp32 tensors, one per name, holding anything: memory the transport reuses round after round)."""
        self.check(deltas)
        if not set(deltas) <= set(weights):
            raise ValueError(f"Deltas from clients {sorted(deltas)} but weights for clients {sorted(weights)}.")
        normalized = normalized_weights(weights, sorted(deltas))
        if into is None:
            aggregate, bad = self.checked_combine(deltas, normalized)
        else:
            aggregate, bad = self.checked_combine(deltas, normalized, into=into)
        if bad:  # the rare path: the policy raises, or the kept clients are combined again
            kept = kept_clients(list(deltas), bad, self.nonfinite)
            aggregate = self.combine({c: deltas[c] for c in kept}, normalized_weights(weights, kept))
        return AggregateResult(aggregate, sorted(bad))

    def checked_combine(
        self, deltas: Deltas, weights: Mapping[int, float], into: Optional[Mapping[str, Tensor]] = None
    ) -> tuple[Optional[dict[str, Tensor]], dict[int, Optional[str]]]:
        """Δ_t over every delta given, and the clients whose delta holds NaN or Inf (with the first such tensor's
        name); the aggregate is ``None`` when there are any. A rule that sums checks while it adds
        (:meth:`sum_into` ``into``, or :meth:`accumulate` into a new sum) and reads each delta once; any other rule
        checks every delta, then combines."""
        if self.reduces_from_partial_sums and type(self).accumulate is not Aggregator.accumulate:
            if into is None:
                total = zeros_like_delta(deltas)
                found = self.accumulate(total, deltas, weights)
            else:
                total = dict(into)
                found = self.sum_into(total, deltas, weights)
            return (None if found else total), dict(found)
        bad = non_finite_clients(deltas)
        return (None if bad else self.combine(deltas, weights)), bad

    def combine(self, deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
        """The rule itself, over finite deltas and weights that sum to 1 (ignore them if the rule is unweighted)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `combine(deltas, weights)`.")

    def accumulate(self, total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float]) -> dict[int, str]:
        """Add these clients' share of Δ_t into ``total`` in place, and return the clients whose delta holds NaN or
        Inf (with the first such tensor's name), found in the same pass: their values are in ``total`` too, and the
        caller sums the kept clients again. ``weights`` are normalized over every client the round keeps, on every
        rank. Only for rules with :attr:`reduces_from_partial_sums`."""
        raise NotImplementedError(f"{type(self).__name__} needs every client's delta; it has no partial sums.")

    def sum_into(self, total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float]) -> dict[int, str]:
        """:meth:`accumulate` into ``total`` whatever it holds (memory an earlier round's sum used): these clients'
        share of Δ_t replaces it. This zeroes ``total`` first; a rule that can write its first client's term
        instead (the mean) overrides it and saves that pass over the memory."""
        for tensor in total.values():
            tensor.zero_()
        return self.accumulate(total, deltas, weights)

    @property
    def sums_in_given_memory(self) -> bool:
        """Whether a transport may hand ``__call__`` the memory to make Δ_t in (``into=``): a rule that sums and keeps
        this class's ``__call__`` and ``checked_combine`` (an override written before ``into`` existed takes none)."""
        rule = type(self)
        return (
            self.reduces_from_partial_sums
            and rule.accumulate is not Aggregator.accumulate
            and rule.__call__ is Aggregator.__call__
            and rule.checked_combine is Aggregator.checked_combine
        )

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that define the rule (its ``repr``, saved in checkpoints and compared)."""
        return {"nonfinite": self.nonfinite}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.settings().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        """The same rule with the same settings (the strategy keeps a copy of the caller's aggregator)."""
        return type(other) is type(self) and other.settings() == self.settings()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


def _arguments_of(cls: type) -> inspect.Signature:
    """``cls``'s constructor arguments, without ``self``."""
    signature = inspect.signature(cls.__init__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


Aggregator.__signature__ = _arguments_of(Aggregator)  # type: ignore[attr-defined]


def normalized_weights(weights: Mapping[int, float], kept: list[int]) -> dict[int, float]:
    """``weights`` of the ``kept`` clients divided by their sum."""
    total = sum(weights[client] for client in kept)
    return {client: weights[client] / total for client in kept}


AggregationMethod = Literal["mean", "median", "trimmed_mean"]
_RULE_OF_METHOD: dict[str, type[Aggregator]] = {}  # filled by the rules' classes, ``class X(Aggregator, method=...)``


def _from_method(
    method: Optional[AggregationMethod] = None,
    clip_norm: Optional[float] = None,
    trim_fraction: Optional[float] = None,
    nonfinite: NonFinitePolicy = "raise",
) -> Aggregator:
    """What ``Aggregator(method=..., ...)`` meant before 0.2: the rule's class, with a FutureWarning naming it."""
    method = "mean" if method is None else method
    check_choice("method", method, get_args(AggregationMethod))
    trim_fraction = 0.1 if trim_fraction is None else trim_fraction
    check_float("trim_fraction", trim_fraction, minimum=0.0, maximum=0.5, max_open=True)  # checked for every rule, as it was
    arguments: dict[str, Any] = {"clip_norm": clip_norm, "nonfinite": nonfinite}
    if method == "trimmed_mean":
        arguments["trim_fraction"] = trim_fraction
    built = _RULE_OF_METHOD[method](**arguments)
    warnings.warn(
        f"`Aggregator(method={method!r}, ...)` is deprecated and will be removed in 0.3: use `{built!r}`"
        " (lightning_parablock exports every rule's class).",
        FutureWarning,
        stacklevel=3,
    )
    return built
