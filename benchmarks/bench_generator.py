"""Outliers per second of the embedded generator: latent only (the method) vs latent + VAE decode.

One run: denoise N outlier latents (timed), then decode the same latents (timed); the ratio of
the two throughputs is the saving of staying in latent space. Uses the pretrained generator at
`artifacts/generators/fmnist-ldm` unless `--generator` names another folder.

    .venv/bin/python benchmarks/bench_generator.py --outliers 256 --steps 50
    .venv/bin/python benchmarks/bench_generator.py --grid docs/img/fmnist-ldm-samples.png

`--grid` also draws, per ID class, real images, their VAE reconstructions, samples conditioned on
real ID embeddings and samples conditioned on boundary outliers, and runs the classifier check:
the condition encoder (a 6-way cosine classifier) scores the decoded samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from oal_shared.data.benchmark import load_benchmark
from oal_shared.embeddings import EmbeddingSet
from oal_synth.generators.embedded import EmbeddedGenerator
from oal_synth.sampler import sample_outliers
from oal_synth.spec import DiffusionConfig, SamplerConfig

DEFAULT_GENERATOR = Path("artifacts/generators/fmnist-ldm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    parser.add_argument("--outliers", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--grid", type=Path, help="write a PNG grid of real / reconstructed / ID / outlier samples")
    parser.add_argument("--grid-guidance", type=float, default=3.0, help="guidance of the grid samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = EmbeddedGenerator.from_pretrained(args.generator, device=args.device)

    # Real outliers: boundary samples around 100 embedded train images per class.
    benchmark = load_benchmark("fmnist-osr")
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(benchmark.id_train.labels == c), 100, replace=False)
                           for c in range(benchmark.num_classes)])  # fmt: skip
    es = EmbeddingSet(
        embeddings=generator.embed_images(benchmark.id_train.images[rows]).numpy(),
        labels=benchmark.id_train.labels[rows],
        space=generator.info.space,
        class_names=benchmark.class_names,
    )
    sampler = SamplerConfig(k=50, select=20, n_candidates=500)
    outliers = sample_outliers(es, sampler, args.outliers, seed=0)
    embeddings = torch.cat([o.embeddings for o in outliers])
    class_ids = [o.class_id for o in outliers for _ in range(len(o))]
    seeds = list(range(len(class_ids)))
    diffusion = DiffusionConfig(
        steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler, batch_size=args.batch_size
    )
    generator.generate_latents(embeddings[:2], class_ids[:2], seeds[:2], diffusion)  # warm-up

    started = time.perf_counter()
    latents = generator.generate_latents(embeddings, class_ids, seeds, diffusion)
    latent_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        images = torch.cat([generator.decode_latents(latents[i : i + args.batch_size])
                            for i in range(0, len(latents), args.batch_size)])  # fmt: skip
    decode_s = time.perf_counter() - started

    count = len(latents)
    latent_rate, full_rate = count / latent_s, count / (latent_s + decode_s)
    device = str(generator.pipeline.unet.device)
    table = Table(title=f"fmnist-ldm: {count} outliers, {args.scheduler} {args.steps} steps, guidance "
                  f"{args.guidance}, batch {args.batch_size}, {device}, {args.threads} threads")  # fmt: skip
    for column in ("output", "seconds", "outliers/s", "relative"):
        table.add_column(column, justify="left" if column == "output" else "right")
    table.add_row("latent z0 (no decode)", f"{latent_s:.2f}", f"{latent_rate:.1f}", "1.00")
    table.add_row(
        "latent + VAE decode", f"{latent_s + decode_s:.2f}", f"{full_rate:.1f}", f"{full_rate / latent_rate:.3f}"
    )
    Console().print(table)
    Console().print(f"decode alone: {decode_s:.3f} s ({decode_s / (latent_s + decode_s):.1%} of latent + decode); "
                    f"images {tuple(images.shape)}")  # fmt: skip
    check = quality_check(generator, benchmark, es, outliers, args) if args.grid else None
    if args.json:
        args.json.write_text(json.dumps({
            "classifier_check": check,
            "outliers": count, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
            "batch_size": args.batch_size, "device": device, "threads": args.threads, "latent_s": latent_s,
            "decode_s": decode_s, "latent_per_s": latent_rate, "with_decode_per_s": full_rate,
        }, indent=2))  # fmt: skip


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [0, 1] -> (B, H, W) uint8."""
    return (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def quality_check(generator: EmbeddedGenerator, benchmark, es: EmbeddingSet, outliers, args) -> dict:
    """Grid of real / VAE reconstruction / ID-conditioned / outlier-conditioned images, and the
    classifier check: the condition encoder's class and confidence on each kind of decoded image."""
    from PIL import Image

    from oal_synth.pretrain import pad_to_vae

    per_row = 8
    diffusion = DiffusionConfig(steps=args.steps, guidance_scale=args.grid_guidance, scheduler=args.scheduler)
    rows, report = [], {}
    kinds = {"real": [], "reconstruction": [], "id-conditioned": [], "outlier-conditioned": []}
    for cls in range(benchmark.num_classes):
        index = np.flatnonzero(es.labels == cls)[:per_row]
        real = benchmark.id_train.images[np.flatnonzero(benchmark.id_train.labels == cls)[:per_row]]
        with torch.no_grad():
            posterior = generator.pipeline.vae.encode(pad_to_vae(real).to(generator.pipeline.vae.device)).latent_dist
            recon = to_uint8(generator.decode_latents(posterior.mean.float().cpu()))
        seeds = [1000 * cls + i for i in range(per_row)]
        id_latents = generator.generate_latents(
            torch.from_numpy(es.embeddings[index]), [cls] * per_row, seeds, diffusion
        )
        outlier = next(o for o in outliers if o.class_id == cls)
        out_latents = generator.generate_latents(outlier.embeddings[:per_row], [cls] * per_row, seeds, diffusion)
        decoded = {
            "real": real,
            "reconstruction": recon,
            "id-conditioned": to_uint8(generator.decode_latents(id_latents)),
            "outlier-conditioned": to_uint8(generator.decode_latents(out_latents)),
        }
        for kind, images in decoded.items():
            kinds[kind].append((cls, images))
        rows.append(np.concatenate([np.concatenate(list(decoded[k]), axis=1) for k in decoded], axis=1))
    grid = np.concatenate(rows, axis=0)  # classes down, four blocks of 8 across
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.grid)

    table = Table(title="Classifier check: condition encoder on decoded images (6 ID classes)")
    for column in ("images", "accuracy vs conditioning class", "mean max-softmax"):
        table.add_column(column, justify="left" if column == "images" else "right")
    for kind, per_class in kinds.items():
        images = np.concatenate([imgs for _, imgs in per_class])
        labels = np.concatenate([np.full(len(imgs), cls) for cls, imgs in per_class])
        with torch.no_grad():
            probs = generator.encoder.logits(generator.embed_images(images)).softmax(dim=1)
        accuracy = float((probs.argmax(1).numpy() == labels).mean())
        confidence = float(probs.max(1).values.mean())
        report[kind] = {"accuracy": accuracy, "max_softmax": confidence}
        table.add_row(kind, f"{accuracy:.3f}", f"{confidence:.3f}")
    Console().print(table)
    Console().print(f"grid written to {args.grid} (rows: classes; blocks: real, reconstruction, ID, outlier)")
    return report


if __name__ == "__main__":
    main()
