"""Generators: the embedded latent diffusion model, Stable Diffusion, and tiny-random.

Only the torch-free parts are re-exported here, so `import oal_synth.generators` stays light for
the API; the model classes live in their modules (`stable_diffusion`, `embedded`, `tiny_random`).
"""

from oal_synth.generators.base import GENERATOR_INFO_FILE, GeneratorInfo, LatentGenerator
from oal_synth.generators.registry import (
    BUILTIN_IDS,
    GeneratorNotFoundError,
    list_generators,
    load_generator,
    resolve_generator_path,
)

__all__ = [
    "BUILTIN_IDS",
    "GENERATOR_INFO_FILE",
    "GeneratorInfo",
    "GeneratorNotFoundError",
    "LatentGenerator",
    "list_generators",
    "load_generator",
    "resolve_generator_path",
]
