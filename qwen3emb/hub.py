"""Publish a bundle on the Hugging Face Hub (``qwen3emb-export push``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qwen3emb.errors import BundleError, MissingDependencyError, OutputError
from qwen3emb.manifest import read_manifest

logger = logging.getLogger(__name__)


def push_bundle(bundle: str | os.PathLike[str], repo_id: str, *, private: bool = False,
                token: str | None = None) -> str:
    """Upload a bundle directory to a Hub model repository (created when missing).

    The bundle's ``README.md`` is its model card; ``config.json`` and the
    sentence-transformers files make the repository loadable by the tools it lists
    (docs/interop.md).

    Args:
        bundle: the bundle directory.
        repo_id: ``owner/name`` of the model repository.
        private: create the repository as private (an existing one keeps its visibility).
        token: a Hub token with write access (default: ``HF_TOKEN`` or the saved login).

    Returns:
        The URL of the upload commit.

    Raises:
        BundleError: the bundle fails its hash check or its parity check failed.
        MissingDependencyError: huggingface_hub is not installed.
        OutputError: the Hub could not be reached or refused the upload.
    """
    manifest = read_manifest(bundle)
    problems = manifest.verify()
    if problems:
        raise BundleError(f"bundle '{bundle}' fails its hash check: {'; '.join(problems)}",
                          hint="Re-run the export; do not edit bundle files by hand")
    if manifest.parity.get("status") == "failed":
        raise BundleError(f"bundle '{bundle}' failed its parity check; not publishing it",
                          hint="See reports/parity.md in the bundle")
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise MissingDependencyError("huggingface_hub is not installed",
                                     hint="pip install 'qwen3emb-export[export]'") from e
    api = HfApi(token=token)  # reads the endpoint and offline mode now, not at import
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=Path(bundle), repo_type="model",
                                 commit_message=f"Upload {manifest.family} bundle "
                                                "(qwen3emb-export)")
    except Exception as e:  # huggingface_hub raises HTTP, connection and offline errors
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise OutputError(f"cannot push '{bundle}' to the Hub repo '{repo_id}': "
                          f"{type(e).__name__}{': ' + reason if reason else ''}",
                          hint="Check the network, the token (HF_TOKEN or --token) and "
                               "that HF_HUB_OFFLINE is unset") from e
    logger.info("pushed %s to %s", bundle, info.commit_url)
    return str(info.commit_url)
