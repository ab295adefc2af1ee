"""Torch-free gallery of face embeddings on FAISS: numpy float32 in, numpy/pandas out.

Never imports torch or `verify`, so it can be used (and tested) without the model stack.
"""

from index.gallery import Gallery, SearchResult
from index.store import GalleryError

__all__ = ["Gallery", "GalleryError", "SearchResult"]
