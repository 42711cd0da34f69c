"""GET /v1/generators: the generators a job may name, read without loading any weights."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from oal_shared.errors import ConfigError
from oal_shared.settings import Settings
from oal_synth.api.deps import SettingsDep
from oal_synth.api.schemas import GeneratorList
from oal_synth.generators.base import GeneratorInfo
from oal_synth.generators.files import read_generator_info
from oal_synth.generators.registry import list_generators, resolve_generator_path

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/generators", tags=["generators"])


@router.get("", response_model=GeneratorList, summary="Generators and the conditioning space of each")
def get_generators(settings: SettingsDep) -> dict:
    return {"generators": [info.to_json() for info in list_generators(settings)]}


def find_generator(generator_id: str, settings: Settings) -> GeneratorInfo | None:
    """The info of generator `generator_id` (an id, or a folder under the generator root).

    None when the folder exists but describes itself only once loaded (no oal_generator.json);
    GeneratorNotFoundError, listing the known ids, when there is no such generator.
    """
    for info in list_generators(settings):
        if info.id == generator_id:
            return info
    folder = resolve_generator_path(generator_id, settings)
    try:
        return read_generator_info(folder)
    except ConfigError:
        return None
