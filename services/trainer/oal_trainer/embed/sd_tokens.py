"""The class-name token rows of a Stable Diffusion folder: the targets of Stage A in SD's token space.

Only the tokenizer and the text encoder are loaded (never the UNet or VAE), from local files only,
with the classes that the folder's `model_index.json` names (as diffusers does), so the same code
reads the tiny random pipeline of the tests and SD v1.4; nothing depends on the hidden size.

A class name of several tokens ("T-shirt/top" -> t, -, shirt, /, top) gets one target: the mean
of its L2-normalised token rows, renormalised. At synthesis the generator replaces EVERY row of the
class word by one outlier direction (docs/METHOD.md, Stage C), so one direction must stand for all
of them; the normalised mean of unit vectors is the direction with the largest summed cosine to
them. (The last token alone would align "T-shirt/top" with "top".)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oal_shared.errors import ConfigError
from oal_shared.token_space import token_space_id

logger = logging.getLogger(__name__)

MODEL_INDEX_FILE = "model_index.json"
TEXT_PARTS = ("tokenizer", "text_encoder")
TOKEN_REDUCTION = "mean of the L2-normalised rows of the class name's tokens"


@dataclass(frozen=True, eq=False)
class TokenSpace:
    """What Stage A needs of an SD folder: its space id, its tokenizer and the input-embedding matrix."""

    folder: Path
    space: str  # "sd-token:<hash>", the id the synthesis service gives the same folder
    tokenizer: object  # the folder's transformers tokenizer
    matrix: torch.Tensor  # (V, D) float32 on the CPU, the text encoder's input embeddings

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])


@dataclass(frozen=True, eq=False)
class ClassTokens:
    """Per class: its name, its token ids and its target direction in the token space."""

    class_names: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    targets: torch.Tensor  # (K, D) float32, unit rows

    def as_json(self) -> dict[str, list[int]]:
        return {name: list(ids) for name, ids in zip(self.class_names, self.token_ids, strict=True)}


def _component(folder: Path, index: dict, part: str):
    """The transformers class that `model_index.json` names for `part`, refusing anything else."""
    entry = index.get(part)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None or not (folder / part).is_dir():
        raise ConfigError(
            f"--generator: {folder} has no {part} (model_index.json: {part} = {entry!r}); embedding sets for a "
            "Stable Diffusion folder need its text_encoder and tokenizer"
        )
    library, class_name = entry
    import transformers

    component = getattr(transformers, str(class_name), None) if library == "transformers" else None
    if component is None:
        raise ConfigError(
            f"--generator: {folder}/model_index.json names {part} = {entry!r}; expected a transformers class"
        )
    return component


def load_token_space(folder: Path) -> TokenSpace:
    """Tokenizer and input-embedding matrix of the SD diffusers `folder` (local files only)."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise ConfigError(f"--generator: {folder} holds no {MODEL_INDEX_FILE}; expected a diffusers SD folder")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--generator: cannot read {index_path} ({exc})") from exc
    if not isinstance(index, dict):
        raise ConfigError(f"--generator: {index_path} is not a JSON object")
    tokenizer_class, encoder_class = (_component(folder, index, part) for part in TEXT_PARTS)
    try:
        tokenizer = tokenizer_class.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        encoder = encoder_class.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--generator: cannot load the tokenizer and text encoder of {folder} ({exc})") from exc
    # float32 whatever the files hold: fp16 -> fp32 is exact, so the space id is unchanged.
    matrix = encoder.get_input_embeddings().weight.detach().float().cpu().clone()  # (V, D)
    del encoder  # only the matrix is needed; SD v1.4's encoder is 0.5 GB
    space = token_space_id(matrix)
    logger.info("token space of %s: %s (vocabulary %d, dim %d)", folder, space, matrix.shape[0], matrix.shape[1])
    return TokenSpace(folder=folder, space=space, tokenizer=tokenizer, matrix=matrix)


def class_token_ids(tokens: TokenSpace, class_name: str) -> tuple[int, ...]:
    """The token ids of `class_name` alone, without start/end tokens; unknown pieces are refused.

    CLIP tokenises word by word, so these are the ids the generator finds after its prompt prefix.
    """
    tokenizer = tokens.tokenizer
    ids = tuple(int(i) for i in tokenizer(class_name, add_special_tokens=False).input_ids)
    if not ids:
        raise ConfigError(f"class name {class_name!r}: the tokenizer of {tokens.folder} gives it no tokens")
    unknown = tokenizer.unk_token_id
    specials = set(tokenizer.all_special_ids)
    if unknown in ids or specials.intersection(ids):
        pieces = tokenizer.convert_ids_to_tokens(list(ids))
        raise ConfigError(
            f"class name {class_name!r}: the tokenizer of {tokens.folder} has no token for part of it "
            f"(tokens {pieces}, {tokenizer.unk_token!r} marks what it does not know); use a name in its "
            "vocabulary with --class-name"
        )
    if len(ids) + 2 > tokenizer.model_max_length:
        raise ConfigError(
            f"class name {class_name!r}: {len(ids)} tokens, more than the text encoder's "
            f"{tokenizer.model_max_length} leave room for"
        )
    return ids


def class_tokens(tokens: TokenSpace, class_names: Sequence[str]) -> ClassTokens:
    """Token ids and unit target rows (K, D) of every class name, in label order."""
    names = tuple(class_names)
    ids = tuple(class_token_ids(tokens, name) for name in names)
    rows = [F.normalize(tokens.matrix[list(token_ids)], dim=1).mean(dim=0) for token_ids in ids]
    targets = F.normalize(torch.stack(rows), dim=1)  # (K, D)
    same = [(a, b) for a in range(len(names)) for b in range(a) if ids[a] == ids[b]]
    if same:
        a, b = same[0]
        raise ConfigError(f"class names {names[b]!r} and {names[a]!r} give the same tokens {list(ids[a])}")
    return ClassTokens(class_names=names, token_ids=ids, targets=targets)
