"""``--push_to_hub REPO_ID``: upload the written output folder to the Hugging Face Hub after ``fit``.

The repository id is checked before anything trains (a bad id would otherwise fail after hours of training);
the upload itself runs once, from global rank 0, after the model folder is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id


def check_push_to_hub(repo_id: Optional[str], output_dir: Optional[str]) -> None:
    """Refuse a malformed repository id, or a push with no ``--output_dir`` to push."""
    if repo_id is None:
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"`--push_to_hub={repo_id!r}` is not a Hub repository id such as 'me/llama32-1b-chat': {error}"
        ) from None
    if not output_dir:
        raise ValueError(f"`--push_to_hub={repo_id!r}` uploads the saved model: give `--output_dir` as well.")


def push_folder(folder: Path, repo_id: str, private: bool = True) -> str:
    """Create ``repo_id`` (private unless it exists already) and upload ``folder``; returns the commit's URL."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    message = "Upload a model fine-tuned with lightning_parablock"
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    return str(getattr(commit, "commit_url", commit))
