"""OutlierDataset over real shards: latents as written, images as the generator's real VAE decodes
them, targets pytorch-ood reads as outliers; and the example of docs/TRAINER.md runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from oal_shared.errors import ConfigError
from oal_shared.outlier_dataset import OUTLIER_TARGET, OutlierDataset
from oal_shared.outlier_images import LatentImageDecoder
from oal_shared.shards import iter_outlier_samples, load_manifest
from tests.utils.trainer_runs import write_test_shards, write_tiny_vae

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def job(tmp_path):
    generator = write_tiny_vae(tmp_path / "generators" / "test-vae")
    return write_test_shards(tmp_path / "job", 2, 6, generator_dir=generator), generator


def test_latent_items_are_the_shards_latents_with_the_outlier_target(job):
    job_dir, _ = job
    dataset = OutlierDataset(job_dir)
    manifest = load_manifest(job_dir)
    samples = list(iter_outlier_samples(manifest.shard_paths))
    assert len(dataset) == len(samples) == manifest.num_samples
    for index, sample in enumerate(samples):
        x, target = dataset[index]
        assert x.dtype == torch.float32 and tuple(x.shape) == manifest.layout.latent_shape
        np.testing.assert_array_equal(x.numpy(), sample.latent.astype(np.float32))
        assert target == OUTLIER_TARGET
    assert OutlierDataset(job_dir, targets="class")[3][1] == samples[3].cls


def test_decoded_items_are_the_vae_images_and_the_hash_is_checked(job, tmp_path):
    job_dir, generator = job
    dataset = OutlierDataset(job_dir, mode="decoded", generator_dir=generator, transform=lambda x: x * 2 - 1)
    decoder = LatentImageDecoder(generator, load_manifest(job_dir))
    x, target = dataset[1]
    expected = decoder.decode(torch.from_numpy(dataset.latents[1:2].astype(np.float32)))[0] * 2 - 1
    torch.testing.assert_close(x, expected)
    assert tuple(x.shape) == (1, 32, 32) and target == OUTLIER_TARGET
    other = write_tiny_vae(tmp_path / "other", image_channels=3)
    with pytest.raises(ConfigError, match="content hash"):
        OutlierDataset(job_dir, mode="decoded", generator_dir=other)
    with pytest.raises(ConfigError, match="generator_dir"):
        OutlierDataset(job_dir, mode="decoded")


def test_pytorch_ood_losses_take_batches_of_id_and_outliers(job):
    loss_module = pytest.importorskip("pytorch_ood.loss", reason="the detectors extra is not installed")
    job_dir, generator = job
    outliers = OutlierDataset(job_dir, mode="decoded", generator_dir=generator)
    x, y = next(iter(DataLoader(outliers, batch_size=4)))
    assert (y < 0).all()  # pytorch-ood's is_unknown
    logits = torch.nn.Linear(32 * 32, 3)(x.flatten(1))
    id_logits, id_y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    # these small logits have energies far above the default margin_out (-7), which would zero the outlier term
    for criterion in (loss_module.OutlierExposureLoss(), loss_module.EnergyRegularizedLoss(margin_out=0.0)):
        loss = criterion(torch.cat([id_logits, logits]), torch.cat([id_y, y]))
        assert torch.isfinite(loss) and loss.requires_grad
        id_only = criterion(id_logits, id_y)
        assert not torch.allclose(loss, id_only)  # the outliers' term is in the loss


def test_the_docs_example_runs(job):
    pytest.importorskip("pytorch_ood", reason="the detectors extra is not installed")
    job_dir, generator = job
    text = (REPO / "docs" / "TRAINER.md").read_text()
    block = text.split("## Using the outliers elsewhere", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, flags=re.DOTALL).group(1)
    code = code.replace('"artifacts/shards/<job-id>"', repr(str(job_dir)))
    code = code.replace('"artifacts/generators/fmnist-ldm"', repr(str(generator)))
    namespace: dict = {}
    exec(compile(code, "docs/TRAINER.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert torch.isfinite(namespace["loss"])
