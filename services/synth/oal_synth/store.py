"""Uploaded embedding sets, kept on disk under `settings.artifact_dir/embedding-sets`, by content id.

An upload is validated in full (shapes, dtypes, finite values, metadata) before anything is
written; the bytes are then stored unchanged as `<id>.safetensors`, beside `<id>.json` with the
summary the API answers with, so a GET never parses the tensors. Uploading the same set twice
gives the same id and stores it once. No torch: the API process uses this.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from oal_shared.embeddings import EmbeddingSet, embedding_set_from_bytes, load_embedding_set
from oal_shared.errors import DataNotFoundError, EmbeddingSetError
from oal_shared.fsio import atomic_write_bytes
from oal_shared.paths import safe_join
from oal_shared.settings import Settings

logger = logging.getLogger(__name__)

STORE_DIRNAME = "embedding-sets"
SET_ID_PATTERN = re.compile(r"^[a-f0-9]{8,64}$")


class EmbeddingSetNotFoundError(DataNotFoundError):
    """No stored embedding set has this id."""


def embedding_set_summary(set_id: str, es: EmbeddingSet, size_bytes: int) -> dict[str, Any]:
    """What POST/GET /v1/embedding-sets answer: id, space, dim, classes, count and per-class counts."""
    labels = np.asarray(es.labels)
    counts = (
        np.bincount(labels, minlength=len(es.class_names)) if labels.size else np.zeros(0, dtype=np.int64)
    )
    return {
        "id": set_id,
        "space": es.space,
        "dim": int(es.embeddings.shape[1]),
        "count": int(es.embeddings.shape[0]),
        "classes": list(es.class_names),
        "class_counts": [int(c) for c in counts],
        "source": es.source,
        "bytes": size_bytes,
    }


class EmbeddingSetStore:
    """Content-addressed files under `root`; every path is built through safe_join."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingSetStore:
        return cls(Path(settings.artifact_dir) / STORE_DIRNAME)

    def put_bytes(self, data: bytes, name: str = "upload") -> dict[str, Any]:
        """Validate a safetensors embedding set and store it; returns its summary (with `created`)."""
        es = embedding_set_from_bytes(data, name)
        set_id = es.content_id()
        if not SET_ID_PATTERN.match(set_id):
            raise EmbeddingSetError(f"{name}: content id {set_id!r} is not 8-64 lowercase hex characters")
        summary = embedding_set_summary(set_id, es, len(data))
        created = not self._tensor_path(set_id).exists()
        if created:
            self.root.mkdir(parents=True, exist_ok=True)
            # Tensors first, summary last: a summary on disk means a complete set (each written
            # through a temp file, fsync and rename, so neither is ever half there).
            atomic_write_bytes(self._tensor_path(set_id), data)
            atomic_write_bytes(self._summary_path(set_id), json.dumps(summary, indent=2).encode())
            logger.info(
                "embedding set %s stored (%d x %d, space %s)",
                set_id,
                summary["count"],
                summary["dim"],
                summary["space"],
            )
        return {**summary, "created": created}

    def describe(self, set_id: str) -> dict[str, Any]:
        path = self._summary_path(set_id)
        if not path.is_file():
            raise EmbeddingSetNotFoundError(self._missing_message(set_id))
        return json.loads(path.read_text())

    def load(self, set_id: str) -> EmbeddingSet:
        path = self._tensor_path(set_id)
        if not self._summary_path(set_id).is_file():
            raise EmbeddingSetNotFoundError(self._missing_message(set_id))
        return load_embedding_set(path)

    def exists(self, set_id: str) -> bool:
        return SET_ID_PATTERN.match(set_id) is not None and self._summary_path(set_id).is_file()

    def _tensor_path(self, set_id: str) -> Path:
        return safe_join(self.root, f"{self._checked(set_id)}.safetensors")

    def _summary_path(self, set_id: str) -> Path:
        return safe_join(self.root, f"{self._checked(set_id)}.json")

    def _missing_message(self, set_id: str) -> str:
        return f"no embedding set {set_id!r} under {self.root}; upload it with POST /v1/embedding-sets"

    @staticmethod
    def _checked(set_id: str) -> str:
        if not SET_ID_PATTERN.match(set_id):
            raise EmbeddingSetNotFoundError(
                f"no embedding set {set_id!r}: ids are 8-64 lowercase hex characters"
            )
        return set_id
