"""Uploads to the Hugging Face Hub: one function, :func:`push_folder`, used by every ``push_to_hub*``.

The folder is written first by the matching save method (adapter, merged model, GGUF file), then
uploaded as it is with ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)`` and one
``upload_folder`` commit. Without a network (``HF_HUB_OFFLINE=1``, DNS or connection failure) the
error is :class:`HubUnreachableError`, naming the repository and saying that nothing was uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RsloraError

__all__ = ["HubError", "HubUnreachableError", "push_folder"]


class HubError(RsloraError):
    """An upload to the Hugging Face Hub failed (bad repo id, no permission, server error)."""


class HubUnreachableError(HubError, ConnectionError):
    """The Hugging Face Hub could not be reached (offline); nothing was uploaded."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause chain) says the server was never reached."""
    names = (
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "OfflineModeIsEnabled",
        "NameResolutionError",
    )
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in names:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of ``folder`` to the model repository ``repo_id`` (created if missing).

    Args:
        folder: a folder written by a save method.
        repo_id: ``"user/name"`` or ``"name"``.
        private: visibility of a newly created repository (``None``: the Hub's default); an existing
            repository keeps its visibility.
        token: Hub token (default: the one ``huggingface-cli login`` stored or ``HF_TOKEN``).
        commit_message: default ``"Upload with rslora_fast"``.

    Returns:
        The URL of the commit (or of the repository when the Hub returns none).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is empty.
        HubUnreachableError: offline or the Hub could not be reached; nothing was uploaded.
        HubError: any other failure reported by the Hub (the message names the repository).
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"nothing to upload: {str(folder)!r} is not a folder with files")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string like 'user/model', got {repo_id!r}")
    if _offline():
        raise HubUnreachableError(
            f"cannot upload to {repo_id!r}: HF_HUB_OFFLINE is set, no network was reached; the files are in "
            f"{str(folder)!r}"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo = getattr(url, "repo_id", None) or repo_id
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or "Upload with rslora_fast",
        )
    except Exception as exc:
        if _is_network_error(exc):
            raise HubUnreachableError(
                f"cannot upload to {repo_id!r}: the Hugging Face Hub could not be reached ({type(exc).__name__}); "
                f"no network was reached and nothing was uploaded; the files are in {str(folder)!r}"
            ) from exc
        raise HubError(f"upload to {repo_id!r} failed: {type(exc).__name__}: {exc}") from exc
    return str(getattr(info, "commit_url", None) or info or url)
