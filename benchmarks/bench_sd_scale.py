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
- the peak resident memory of the process, and on CUDA the peak allocated GPU memory
  (torch.cuda.max_memory_allocated) of the UNet steps and of the decode.

Then the cost of one outlier at `--steps` steps (50) is extrapolated from those per-step times:
latent-only (what OAL keeps) against latent + pixel decode (what a pixel-space method pays).

`--device cuda --dtype float16` measures the GPU path (docs/GPU.md; benchmarks/gpu_check.sh runs it);
every timed call is followed by torch.cuda.synchronize there, so the times are the device's.
`--latent-size 8` shrinks the latents (not the networks) for a quick dry run on the CPU.

    .venv/bin/python benchmarks/bench_sd_scale.py --json artifacts/bench/sd_scale.json
    .venv/bin/python benchmarks/bench_sd_scale.py --batches 1 2 --repeats 1   # quicker
    .venv/bin/python benchmarks/bench_sd_scale.py --device cuda --dtype float16 --batches 1 2 4 8
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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)  # CUDA kernels run asynchronously: wait for them before reading the clock
    return time.perf_counter() - started


def peak_gpu_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def denoise(unet, vae, text_encoder, *, batch: int, steps: int, guidance: float, device, dtype, latent_size=None):
    """A whole outlier batch as the synthesis worker makes one: text encoding, `steps` PLMS steps with
    classifier-free guidance, then the VAE decode. Random token ids (no tokenizer files) and random
    conditioning: the arithmetic, not the image, is the point. Returns (latents, images)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_config(load_json("scheduler.json"))
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    size = latent_size or unet.config.sample_size
    tokens = torch.randint(0, text_encoder.config.vocab_size, (2 * batch, 77), generator=generator).to(device)
    context = text_encoder(tokens)[0].to(dtype)  # (2B, 77, 768): unconditional rows, then conditional
    latents = (torch.randn((batch, 4, size, size), generator=generator) * scheduler.init_noise_sigma).to(device, dtype)
    for t in scheduler.timesteps:
        noise = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return latents, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="outliers per UNet call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after one warm-up)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of one outlier (extrapolated)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (only > 1 matters: batch doubled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and activations")
    parser.add_argument("--latent-size", type=int, help="latent side (default: the UNet's 64, i.e. 512 px)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    unet, vae, text_encoder = build_models()
    params = {"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder)}
    params_ratio = {name: params[name] / EXPECTED_PARAMS[name] for name in params}
    unet, vae, text_encoder = (module.to(device, dtype) for module in (unet, vae, text_encoder))
    rss_models = peak_rss_gib()
    cfg = 2 if args.guidance > 1 else 1
    side = args.latent_size or unet.config.sample_size
    latent = 4, side, side
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator).to(device)
    hidden = text_encoder.config.hidden_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    def unet_step(batch: int) -> None:
        rows = batch * cfg
        unet(randn(rows, *latent), torch.tensor(500, device=device), encoder_hidden_states=randn(rows, 77, hidden))

    def decode() -> None:
        vae.decode(randn(1, *latent) / vae.config.scaling_factor)

    def encode_prompt() -> None:
        text_encoder(tokens)

    def peak_of(fn) -> float | None:
        """Peak GPU memory allocated during one call (CUDA only): the weights plus its activations."""
        if device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return peak_gpu_gib(device)

    unet_s: dict[int, list[float]] = {batch: [] for batch in args.batches}
    decode_s: list[float] = []
    text_s: list[float] = []
    peak_gib: dict[str, float | None] = {}
    with torch.inference_mode():
        # Warm-up: first calls allocate and choose kernels; on CUDA each one's peak memory is read then.
        for batch in args.batches:
            peak_gib[f"unet_batch_{batch}"] = peak_of(lambda batch=batch: unet_step(batch))
        peak_gib["vae_decode"] = peak_of(decode)
        encode_prompt()
        # Interleaved repeats: one of every measurement per round.
        for _ in range(args.repeats):
            for batch in args.batches:
                unet_s[batch].append(timed(lambda batch=batch: unet_step(batch), device))
            decode_s.append(timed(decode, device))
            text_s.append(timed(encode_prompt, device))
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
            "unet_it_per_s": 1 / step,  # denoising steps per second for the whole batch (guidance included)
            "peak_gpu_gib": peak_gib[f"unet_batch_{batch}"],
            "unet_rows": batch * cfg,
            "outlier_latent_only_s": latent_only,
            "outlier_with_decode_s": with_decode,
            "decode_share": decode_one / with_decode,
        }

    where = f"CPU {args.threads} threads" if device.type == "cpu" else str(device)
    table = Table(
        title=f"SD v1.x architecture, random weights, {where}, {args.dtype}, latents {side}x{side}; "
        f"load {' '.join(load_before)}"
    )
    columns = ("batch (rows)", "UNet s/step", "it/s", f"outlier {args.steps} steps, latent", "+ decode", "decode share")
    for column in columns:
        table.add_column(column, justify="right")
    for batch, row in per_batch.items():
        table.add_row(
            f"{batch} ({row['unet_rows']})",
            f"{row['unet_step_s']:.3f}",
            f"{row['unet_it_per_s']:.2f}",
            f"{row['outlier_latent_only_s']:.1f} s",
            f"{row['outlier_with_decode_s']:.1f} s",
            f"{row['decode_share']:.1%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"VAE decode {side * 8}x{side * 8}: {decode_one:.2f} s; "
        f"text encoder (2 x 77 tokens): {text_one * 1000:.0f} ms; "
        f"params UNet {params['unet'] / 1e6:.1f}M, VAE {params['vae'] / 1e6:.1f}M, "
        f"text {params['text_encoder'] / 1e6:.1f}M; peak RSS {peak_rss_gib():.2f} GiB "
        f"(models built: {rss_models:.2f} GiB); load after {' '.join(load_after)}"
    )
    if device.type == "cuda":
        console.print("peak GPU memory allocated (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in peak_gib.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "threads": args.threads, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
            "device": str(device), "dtype": args.dtype, "latent_size": side, "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "peak_gpu_gib": peak_gib,
            "extrapolated": True, "params": params, "params_vs_sd_v1_4": params_ratio,
            "vae_decode_512_s": decode_one, "vae_decode_512_s_all": decode_s,
            "text_encoder_s": text_one, "text_encoder_s_all": text_s,
            "per_batch": per_batch, "peak_rss_gib": peak_rss_gib(), "rss_after_build_gib": rss_models,
            "loadavg_before": load_before, "loadavg_after": load_after,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
