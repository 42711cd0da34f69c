"""Jobs that break inside the worker end `failed` with their reason, and the worker goes on.

The worker runs in this process in burst mode (`run_burst_worker`): one SynthesisWorker takes the
broken jobs and then a good one, so "the worker lives on" means that same worker finishes the
good job after the failures. Faults are real: a generator folder with a corrupt or missing model
file, and an out-of-memory raised from inside `generate_latents` of the loaded generator.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from rq import get_current_job

from oal_synth import synthesis
from oal_synth.api.app import create_app
from oal_synth.generators.base import GENERATOR_INFO_FILE
from oal_synth.generators.registry import clear_generator_cache
from oal_synth.generators.stable_diffusion import StableDiffusionGenerator
from tests.reliability.conftest import TinyService, tiny_job_spec
from tests.utils.live_server import LiveServer, run_burst_worker

pytestmark = [pytest.mark.redis, pytest.mark.slow]

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture
def client(tiny_service: TinyService, redis_conn):
    with LiveServer(create_app(tiny_service.settings)) as server, server.client() as client:
        yield client
    clear_generator_cache()


def broken_copy(service: TinyService, name: str, damage) -> str:
    """A copy of tiny-random under another folder name, damaged by `damage(folder)`.

    Its oal_generator.json is removed: the folder is then a bare diffusers folder the API accepts
    by name (it cannot describe it without loading), so only the worker finds the damage.
    """
    source = Path(service.settings.generator_root) / "tiny-random"
    folder = Path(service.settings.generator_root) / name
    shutil.copytree(source, folder)
    (folder / GENERATOR_INFO_FILE).unlink()
    damage(folder)
    return name


def corrupt_unet_weights(folder: Path) -> None:
    path = folder / UNET_WEIGHTS
    path.write_bytes(b"\x00\x13garbage, not a safetensors header" + path.read_bytes()[64:128])


def remove_unet(folder: Path) -> None:
    shutil.rmtree(folder / "unet")


def count_generator_loads(monkeypatch) -> Counter[str]:
    """Count, per RQ job id, how often the job asked for its generator (once per attempt)."""
    attempts: Counter[str] = Counter()
    real_load = synthesis.load_generator

    def counting_load(*args, **kwargs):
        attempts[get_current_job().id] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(synthesis, "load_generator", counting_load)
    return attempts


def submit(client, spec: dict) -> str:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("damage", "words"),
    [(corrupt_unet_weights, "unet/diffusion_pytorch_model.safetensors"), (remove_unet, "unet/")],
    ids=["corrupt-unet-weights", "unet-missing"],
)
def test_generator_that_fails_to_load_fails_the_job_and_the_worker_goes_on(
    client, tiny_service, monkeypatch, damage, words
):
    broken = broken_copy(tiny_service, "damaged-model", damage)
    load_attempts = count_generator_loads(monkeypatch)
    bad_id = submit(client, tiny_job_spec(tiny_service.set_id, generator=broken))
    good_id = submit(client, tiny_job_spec(tiny_service.set_id))

    assert run_burst_worker(tiny_service.settings)

    bad = client.get(f"/v1/jobs/{bad_id}").json()
    good = client.get(f"/v1/jobs/{good_id}").json()
    assert bad["status"] == "failed"
    assert load_attempts[bad_id] == 1  # files on disk do not heal: no retries spent on them
    assert bad["error"]["code"] == "GeneratorLoadError"
    assert words in bad["error"]["message"], bad["error"]
    assert broken in bad["error"]["message"], bad["error"]
    assert not (tiny_service.settings.shard_root / bad_id / "manifest.json").exists()
    assert good["status"] == "finished", good["error"]
    assert good["progress"]["done"] == good["progress"]["total"]


@pytest.mark.parametrize(
    "oom",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total capacity)"),
    ],
    ids=["torch-OutOfMemoryError", "RuntimeError-cuda-oom"],
)
def test_out_of_memory_while_denoising_fails_the_job_naming_oom(client, tiny_service, monkeypatch, oom):
    oom_job_ids: set[str] = set()
    real_generate = StableDiffusionGenerator.generate_latents

    def generate_or_run_out_of_memory(self, *args, **kwargs):
        job = get_current_job()
        if job is not None and job.id in oom_job_ids:
            raise oom
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionGenerator, "generate_latents", generate_or_run_out_of_memory)
    oom_id = submit(client, tiny_job_spec(tiny_service.set_id))
    oom_job_ids.add(oom_id)
    good_id = submit(client, tiny_job_spec(tiny_service.set_id, seed=3))

    assert run_burst_worker(tiny_service.settings)

    failed = client.get(f"/v1/jobs/{oom_id}").json()
    good = client.get(f"/v1/jobs/{good_id}").json()
    assert failed["status"] == "failed"
    reason = f"{failed['error']['code']} {failed['error']['message']}".lower()
    assert "out of memory" in reason or "outofmemory" in reason, failed["error"]
    assert good["status"] == "finished", good["error"]
