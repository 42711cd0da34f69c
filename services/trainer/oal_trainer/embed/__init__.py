"""Stage A for Stable Diffusion: embedding sets in an SD folder's token space (`oal-train embed`)."""

from oal_trainer.embed.make import METHODS, EmbedConfig, EmbedResult, make_embedding_set
from oal_trainer.embed.sd_tokens import TOKEN_REDUCTION, ClassTokens, TokenSpace, class_tokens, load_token_space

__all__ = [
    "METHODS",
    "TOKEN_REDUCTION",
    "ClassTokens",
    "EmbedConfig",
    "EmbedResult",
    "TokenSpace",
    "class_tokens",
    "load_token_space",
    "make_embedding_set",
]
