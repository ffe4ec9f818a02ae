"""The handshake before round 0: every site says how it runs, the server refuses any disagreement by name.

Sites of one federation must run the same federation: the same clients and placement, blocks, rounds, staleness,
codec and aggregator, the same initial weights, and, on a resume, the same round. Each site sends a :data:`Hello`
(its run settings, a SHA-256 of its trainable weights, the round it resumes at); the server compares every field
with site 0's and with the round it has on record, and refuses the first difference, naming the site and the field,
before any site trains. A site learns it was accepted when the first exchange arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

Hello = dict[str, Any]
"""What a site answers the handshake with (JSON): see :func:`check_hellos` for the fields."""

COMPARED = (
    "library_version", "num_sites", "num_clients", "placement", "rounds", "staleness", "codec", "aggregator",
    "comm_timeout", "layout", "settings", "next_round", "resume_epoch", "weights_sha256",
)  # fmt: skip
"""The fields every site must agree on, in the order they are compared (settings key by key)."""


class HandshakeRefused(RuntimeError):
    """The sites (or the sites and the server) do not run the same federation; the message names who and what."""


def weights_fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order (the same weights give the same
    hash on every machine)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        host = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{host.dtype}|{list(host.shape)}|".encode())
        if host.numel():
            digest.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RunAgreement:
    """What every site agreed on: the server runs the pipeline from it."""

    sites: Mapping[int, int]  # Flower node id -> site index
    start_round: int  # the first round whose uploads the server asks for
    rounds: int  # rounds the sites train; the final message follows the last one's request
    staleness: int
    comm_timeout: float
    first_reply_rounds: int  # rounds a site trains before it can answer the first request
    hello: Hello  # site 0's hello (every site's agrees)

    def layout(self, block: int) -> list[tuple[str, torch.Size]]:
        return [(name, torch.Size(shape)) for name, shape in self.hello["layout"][block]]

    @property
    def placement(self) -> list[int]:
        return list(self.hello["placement"])


def check_hellos(
    hellos: Mapping[int, Hello], num_sites: int, server_round: Optional[int], state_path: str
) -> RunAgreement:
    """Every site's hello against site 0's and the server's record; the agreement, or :class:`HandshakeRefused`.

    ``hellos`` are keyed by Flower node id; ``server_round`` is the next round the server has on record for this
    output folder (``None``: a new run), ``state_path`` names that record in errors.
    """
    if len(hellos) > num_sites:
        raise HandshakeRefused(
            f"{len(hellos)} SuperNodes answered and the federation has {num_sites} sites (--run-config num-sites=...):"
            " every SuperNode connected to this SuperLink must be one site's"
        )
    by_site: dict[int, tuple[int, Hello]] = {}
    for node, hello in hellos.items():
        site = hello.get("site")
        if not isinstance(site, int) or not 0 <= site < num_sites:
            raise HandshakeRefused(
                f"the site on Flower node {node} says it is site {site!r}; expected 0..{num_sites - 1}"
            )
        if site in by_site:
            raise HandshakeRefused(
                f"Flower nodes {by_site[site][0]} and {node} both say they are site {site}: give each site its own"
                " index (FlowerSite(site=...))"
            )
        if hello.get("num_sites") != num_sites:
            raise HandshakeRefused(
                f"site {site} runs a federation of {hello.get('num_sites')!r} sites, the server one of {num_sites}"
                " (--run-config num-sites=...)"
            )
        by_site[site] = (node, hello)
    missing = sorted(set(range(num_sites)) - set(by_site))
    if missing:
        raise HandshakeRefused(f"no site answered as site(s) {missing}")
    reference = by_site[0][1]
    for site in range(1, num_sites):
        hello = by_site[site][1]
        for field in COMPARED:
            mine, theirs = hello.get(field), reference.get(field)
            if field == "settings" and isinstance(mine, dict) and isinstance(theirs, dict):
                for key in sorted(set(mine) | set(theirs)):
                    if mine.get(key) != theirs.get(key):
                        raise HandshakeRefused(_differs(site, f"setting {key!r}", mine.get(key), theirs.get(key)))
            elif mine != theirs:
                raise HandshakeRefused(_differs(site, field, mine, theirs))
    next_round, resume_epoch = reference["next_round"], reference["resume_epoch"]
    _check_server_round(next_round, server_round, state_path)
    staleness = int(reference["staleness"])
    return RunAgreement(
        sites={node: site for site, (node, _) in by_site.items()},
        start_round=next_round,
        rounds=int(reference["rounds"]),
        staleness=staleness,
        comm_timeout=float(reference["comm_timeout"]),
        first_reply_rounds=max(1, next_round + staleness - resume_epoch) if staleness else 1,
        hello=reference,
    )


def _differs(site: int, field: str, mine: Any, theirs: Any) -> str:
    if field == "weights_sha256":
        return (
            f"site {site}'s initial trainable weights (sha256 {str(mine)[:12]}...) differ from site 0's"
            f" ({str(theirs)[:12]}...): start every site from the same model, seed and checkpoint round"
        )
    if field == "layout":
        return f"site {site} partitions the model into other blocks than site 0: use the same model and block options"
    shown = lambda value: repr(value) if len(repr(value)) < 200 else repr(value)[:200] + "..."  # noqa: E731
    return f"site {site} differs from site 0 in {field}: {shown(mine)} vs {shown(theirs)}"


def _check_server_round(next_round: int, server_round: Optional[int], state_path: str) -> None:
    """The sites resume where the server's record says the federation is (or one round earlier: an aggregate the
    server made but no site checkpointed is made again from the same uploads)."""
    if server_round is None:
        if next_round != 0:
            raise HandshakeRefused(
                f"the sites resume at round {next_round}, but the server has no record of this run ({state_path} does"
                " not exist): start the server with the output folder of the run being resumed (--run-config"
                " output-dir=...)"
            )
        return
    if next_round not in (server_round - 1, server_round):
        raise HandshakeRefused(
            f"the sites resume at round {next_round}, the server's record ({state_path}) at round {server_round} (the"
            " first round not aggregated yet): resume the sites from checkpoints whose first round awaiting its"
            f" aggregate is {max(server_round - 1, 0)} or {server_round}, or start a new run in a new output folder"
        )
