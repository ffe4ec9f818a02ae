"""The package's module paths from before it moved into layers, importable for one more release.

``import lightning_parablock.strategy``, ``from lightning_parablock.callback import ParaBlockCallback`` or a config's
``class_path: lightning_parablock.strategy.FederatedBlockStrategy`` keep working: the old path is a module holding
the names of the module(s) that replaced it, and importing it warns once, naming the new path. Nothing in the
package imports an old path (``tests/test_layers.py``); this module and its entry in ``__init__`` go with the next
release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Optional

PACKAGE = __name__.rpartition(".")[0]

MOVED: dict[str, tuple[str, ...]] = {
    "aggregate": ("aggregation.aggregator", "aggregation.rules"),
    "blocks": ("core.blocks",),
    "callback": ("callbacks.parablock",),
    "clients": ("core.clients",),
    "collective": ("comm.distributed", "fault_tolerance.fault_watch"),
    "compress": ("comm.codecs",),
    "cuda_overlap": ("core.device_copies",),
    "fedcybgd": ("strategies.fedcybgd",),
    "federation": ("core.federation",),
    "flora": ("strategies.flora", "aggregation.stacking"),
    "lora": ("core.lora",),
    "master": ("core.master_weights",),
    "method_config": ("cli.recipe_method",),
    "output": ("cli.output_folder",),
    "preemption": ("fault_tolerance.preemption",),
    "preflight": ("cli.preflight",),
    "probe": ("strategies.gradient_probe",),
    "report": ("telemetry.report",),
    "round_log": ("callbacks.round_line",),
    "sampler": ("core.sampler",),
    "schedule": ("core.schedule",),
    "sigterm": ("fault_tolerance.preemption",),
    "strategy": ("strategies.federated_block",),
    "timeline": ("telemetry.timeline",),
    "validation": ("argument_checks",),
}
"""Each old module (under the package) and the module(s) its names now live in, the first holding most of them."""


class MovedModuleWarning(DeprecationWarning):
    """An old module path was imported; shown by default, as Lightning shows its own deprecations."""


warnings.simplefilter("default", category=MovedModuleWarning)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of :data:`MOVED` and builds it from the new modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Optional[ModuleType] = None) -> Any:
        package, _, old = fullname.rpartition(".")
        if package != PACKAGE or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # a plain module, filled in by exec_module

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__.rpartition(".")[2]
        new = [f"{PACKAGE}.{name}" for name in MOVED[old]]
        sources = [importlib.import_module(name) for name in new]
        for source in reversed(sources):  # the first module's names win
            module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})
        module.__doc__ = f"Moved to {' and '.join(new)}; this path goes with the next release."
        warnings.warn(
            f"`{module.__name__}` has moved to `{'` and `'.join(new)}`; import from there (the old path goes with the"
            " next release).",
            MovedModuleWarning,
            stacklevel=_importer_stacklevel(),
        )


def _importer_stacklevel() -> int:
    """The stack level of the code that imported the old path: ``warnings`` skips importlib's bootstrap frames
    itself; ``importlib.import_module`` (how configs import a class path) is skipped here."""
    level, frame = 2, sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back  # not counted by `warnings`
        elif name == importlib.__file__:
            level, frame = level + 1, frame.f_back
        else:
            return level
    return level


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
