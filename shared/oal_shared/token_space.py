"""The id of a Stable Diffusion conditioning space, computed the same way on every side.

The synthesis service labels an SD generator's space with it, and `oal-train embed` labels the
embedding sets it makes for that generator; the job check compares the two labels
(docs/METHOD.md, Stage A). Both import it from here because the trainer never imports the
synthesis service. No torch import: a tensor is converted through its own methods.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["TOKEN_SPACE_PREFIX", "token_space_id"]

TOKEN_SPACE_PREFIX = "sd-token:"
SPACE_HASH_LENGTH = 12  # hex digits of sha256 kept in the id


def token_space_id(token_embedding) -> str:
    """ "sd-token:" + short sha256 of the token-embedding matrix (V, D), rounded to float16.

    `token_embedding` is a torch tensor (any device or dtype) or a numpy array. Rounding first
    makes the id the same whether the model was loaded in float32 or float16 (float32 -> float16
    rounding is exact to repeat); bfloat16 weights give another id.
    """
    if hasattr(token_embedding, "detach"):  # a torch tensor
        matrix = token_embedding.detach().to("cpu").half().contiguous().numpy()
    else:
        matrix = np.asarray(token_embedding).astype(np.float16)
    if matrix.ndim != 2:
        raise ValueError(f"token_embedding: expected a 2-D (vocab, dim) matrix, got shape {matrix.shape}")
    digest = hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest()
    return TOKEN_SPACE_PREFIX + digest[:SPACE_HASH_LENGTH]
