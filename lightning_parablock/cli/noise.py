"""Known dependency noise that ``parablock`` filters in its own process, each by its exact message and origin.

A fine-tuner's first screen should hold what the run says, not what installed packages advertise or deprecate
about their own code. Filtered here, and only in the ``parablock`` process (a Python user's Trainer prints what
Lightning prints): Lightning's tips to install its cloud loggers, the deprecation torch 2.13 raises inside
Lightning's own ``_pytree`` copy, and the ``log_every_n_steps`` warning, which the training loss logged per step
for every client by ``ParaBlockCallback`` makes moot. Warnings of the user's own code never match: each filter
names the module that raises it.
"""

from __future__ import annotations

import logging
import warnings

_TIP = "💡 Tip: For seamless cloud"
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TIP)


def quiet_dependency_noise() -> None:
    """Install the filters (once per process)."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        module=r"lightning\.pytorch\.loops\.fit_loop",
    )
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)
