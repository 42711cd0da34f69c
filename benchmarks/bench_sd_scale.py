"""Synthesis cost at Stable Diffusion v1.x scale, random weights, no download.

The UNet, VAE and CLIP text encoder are built from the SD v1.x configs in
benchmarks/sd_v1_configs/ (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
CLIPTextModel) with random weights, so the arithmetic is exactly that of the real pipeline while
nothing is fetched. Measured on the CPU with few repetitions, interleaved over batch sizes so load
drifts hit all of them alike:

- the UNet's seconds per denoising step on 4x64x64 latents at batch 1/2/4, with classifier-free
  guidance (the UNet sees the batch doubled: unconditional + conditional rows);
- the VAE decode of one 4x64x64 latent to a 512x512 image;
- the text encoder on one 77-token prompt pair (unconditional + conditional);
- the peak resident memory of the process.

Then the cost of one outlier at `--steps` steps (50) is extrapolated from those per-step times:
latent-only (what OAL keeps) against latent + pixel decode (what a pixel-space method pays).

    .venv/bin/python benchmarks/bench_sd_scale.py --json artifacts/bench/sd_scale.json
    .venv/bin/python benchmarks/bench_sd_scale.py --batches 1 2 --repeats 1   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from rich.console import Console
from rich.table import Table
from transformers import CLIPTextConfig, CLIPTextModel

CONFIGS = Path(__file__).parent / "sd_v1_configs"
# Parameter counts of the released SD v1.4 components, to check the configs build the same networks.
EXPECTED_PARAMS = {"unet": 859.5e6, "vae": 83.7e6, "text_encoder": 123.1e6}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def load_json(name: str) -> dict:
    config = json.loads((CONFIGS / name).read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def build_models() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**load_json("unet.json")).eval()
    vae = AutoencoderKL(**load_json("vae.json")).eval()
    text = load_json("text_encoder.json")
    text.pop("architectures", None)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
    return unet, vae, text_encoder


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="outliers per UNet call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after one warm-up)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of one outlier (extrapolated)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (only > 1 matters: batch doubled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    unet, vae, text_encoder = build_models()
    params = {"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder)}
    params_ratio = {name: params[name] / EXPECTED_PARAMS[name] for name in params}
    rss_models = peak_rss_gib()
    cfg = 2 if args.guidance > 1 else 1
    latent = 4, unet.config.sample_size, unet.config.sample_size
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator)
    hidden = text_encoder.config.hidden_size

    def unet_step(batch: int) -> None:
        rows = batch * cfg
        unet(
            torch.randn((rows, *latent), generator=generator),
            torch.tensor(500),
            encoder_hidden_states=torch.randn((rows, 77, hidden), generator=generator),
        )

    def decode() -> None:
        vae.decode(torch.randn((1, *latent), generator=generator) / vae.config.scaling_factor)

    def encode_prompt() -> None:
        text_encoder(tokens)

    unet_s: dict[int, list[float]] = {batch: [] for batch in args.batches}
    decode_s: list[float] = []
    text_s: list[float] = []
    with torch.inference_mode():
        # Warm-up: first calls allocate and choose kernels.
        for batch in args.batches:
            unet_step(batch)
        decode()
        encode_prompt()
        # Interleaved repeats: one of every measurement per round.
        for _ in range(args.repeats):
            for batch in args.batches:
                unet_s[batch].append(timed(lambda batch=batch: unet_step(batch)))
            decode_s.append(timed(decode))
            text_s.append(timed(encode_prompt))
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    decode_one = min(decode_s)
    text_one = min(text_s)
    per_batch = {}
    for batch, times in unet_s.items():
        step = min(times)
        latent_only = args.steps * step / batch  # per outlier
        with_decode = latent_only + decode_one
        per_batch[batch] = {
            "unet_step_s": step,
            "unet_step_s_all": times,
            "unet_rows": batch * cfg,
            "outlier_latent_only_s": latent_only,
            "outlier_with_decode_s": with_decode,
            "decode_share": decode_one / with_decode,
        }

    table = Table(
        title=f"SD v1.x architecture, random weights, CPU {args.threads} threads, fp32; load {' '.join(load_before)}"
    )
    for column in ("batch (rows)", "UNet s/step", f"outlier {args.steps} steps, latent", "+ decode", "decode share"):
        table.add_column(column, justify="right")
    for batch, row in per_batch.items():
        table.add_row(
            f"{batch} ({row['unet_rows']})",
            f"{row['unet_step_s']:.2f}",
            f"{row['outlier_latent_only_s']:.1f} s",
            f"{row['outlier_with_decode_s']:.1f} s",
            f"{row['decode_share']:.1%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"VAE decode 512x512: {decode_one:.2f} s; text encoder (2 x 77 tokens): {text_one * 1000:.0f} ms; "
        f"params UNet {params['unet'] / 1e6:.1f}M, VAE {params['vae'] / 1e6:.1f}M, "
        f"text {params['text_encoder'] / 1e6:.1f}M; peak RSS {peak_rss_gib():.2f} GiB "
        f"(models built: {rss_models:.2f} GiB); load after {' '.join(load_after)}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "threads": args.threads, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
            "extrapolated": True, "params": params, "params_vs_sd_v1_4": params_ratio,
            "vae_decode_512_s": decode_one, "vae_decode_512_s_all": decode_s,
            "text_encoder_s": text_one, "text_encoder_s_all": text_s,
            "per_batch": per_batch, "peak_rss_gib": peak_rss_gib(), "rss_after_build_gib": rss_models,
            "loadavg_before": load_before, "loadavg_after": load_after,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
