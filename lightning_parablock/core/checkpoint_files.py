"""The tensors of a Hugging Face checkpoint, read one at a time from its safetensors files (memory-mapped).

Used to check a trained model against the checkpoint it started from without loading a second model: a LoRA
adapter saved alone is only this model again when the base weights are still the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import Tensor


class CheckpointTensors:
    """The tensors of the checkpoint ``name_or_path`` (a local folder, or a Hub name already in the local cache).

    Raises ``FileNotFoundError`` for a checkpoint without ``.safetensors`` files (a ``.bin`` one is not read: it
    would be unpickled whole) or one that is neither a folder nor cached.
    """

    def __init__(self, name_or_path: str, revision: Optional[str] = None) -> None:
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.json"]))  # fmt: skip
        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{name_or_path!r} holds no .safetensors files")
        self._file_of: dict[str, Path] = {}
        for file in self.files:
            with safe_open(file, framework="pt") as opened:
                self._file_of.update(dict.fromkeys(opened.keys(), file))

    def get(self, name: str) -> Optional[Tensor]:
        """The tensor saved under ``name``, or ``None`` when the checkpoint has none."""
        file = self._file_of.get(name)
        if file is None:
            return None
        with safe_open(file, framework="pt") as opened:
            return opened.get_tensor(name)
