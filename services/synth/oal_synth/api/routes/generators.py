"""GET /v1/generators: the generators a job may name, read without loading any weights."""

from __future__ import annotations

from fastapi import APIRouter

from oal_synth.api.deps import SettingsDep
from oal_synth.api.schemas import GeneratorList
from oal_synth.generators.registry import list_generators

router = APIRouter(prefix="/v1/generators", tags=["generators"])


@router.get("", response_model=GeneratorList, summary="Generators and the conditioning space of each")
def get_generators(settings: SettingsDep) -> dict:
    return {"generators": [info.to_json() for info in list_generators(settings)]}
