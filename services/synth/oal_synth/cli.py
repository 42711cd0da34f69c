"""`oal-synth`: run the API and workers, pretrain the embedded generator, submit and follow jobs.

    oal-synth serve                      the REST API (uvicorn) on OAL_API_HOST:OAL_API_PORT
    oal-synth worker [--burst]           a synthesis worker on OAL_QUEUE_NAME
    oal-synth pretrain --preset demo     train the embedded generator (fmnist-ldm)
    oal-synth quality GENERATOR_DIR      measure its blur, per-class Frechet distance, outlier placement
    oal-synth submit spec.json           submit over REST and follow the job to its end
    oal-synth status JOB_ID              a job's state as a table

Client commands exit 1 when the API cannot be reached, 3 when it refuses the request or the job
ends other than finished. Heavy imports (torch, uvicorn) happen inside the command that needs them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from oal_shared.settings import get_settings

logger = logging.getLogger(__name__)

EXIT_CONNECTION = 1
EXIT_REFUSED = 3
TERMINAL = {"finished", "failed", "canceled", "stopped"}

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
console = Console()
err_console = Console(stderr=True)


def _default_url() -> str:
    settings = get_settings()
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    return f"http://{host}:{settings.api_port}"


# Options every client command shares.
UrlOption = Annotated[
    str | None, typer.Option("--url", help="API base URL [default: http://OAL_API_HOST:OAL_API_PORT]")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="OAL_API_TOKEN", help="Bearer token [default: OAL_API_TOKEN]")
]


def _client(url: str | None, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url or _default_url(), headers=headers, timeout=30.0)


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _json_or_fail(response: httpx.Response, expected: set[int]) -> dict:
    if response.status_code in expected:
        return response.json()
    try:
        error = response.json().get("error", {})
        message = error.get("message", response.text)
        if error.get("field"):
            message = f"{message} (field: {error['field']})"
    except ValueError:
        message = response.text
    raise _fail(
        f"{response.request.method} {response.request.url.path} answered {response.status_code}: {message}",
        EXIT_REFUSED,
    )


# ---------------------------------------------------------------------------- services


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [default: OAL_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: OAL_API_PORT]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the REST API (OpenAPI at /docs)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "oal_synth.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=log_level,
    )


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Quit once the queue is empty")] = False,
    queue: Annotated[list[str] | None, typer.Option(help="Queue(s) to work on [default: OAL_QUEUE_NAME]")] = None,
    heartbeat: Annotated[
        int | None, typer.Option(help="Seconds between heartbeats of a running job [default: OAL_WORKER_HEARTBEAT_S]")
    ] = None,
    maintenance: Annotated[
        int | None,
        typer.Option(help="Seconds between searches for abandoned jobs [default: OAL_WORKER_MAINTENANCE_S]"),
    ] = None,
    redis_wait: Annotated[float | None, typer.Option(help="Give up after this many seconds without Redis")] = None,
) -> None:
    """Run a synthesis worker (keeps generators loaded between jobs; SIGTERM stops it gracefully)."""
    import redis.exceptions

    from oal_synth.worker import run_worker

    settings = get_settings()
    try:
        run_worker(
            settings,
            queue_names=queue or None,
            burst=burst,
            heartbeat_s=heartbeat or settings.worker_heartbeat_s,
            maintenance_s=maintenance or settings.worker_maintenance_s,
            redis_wait_s=redis_wait,
        )
    except redis.exceptions.ConnectionError as exc:
        raise _fail(str(exc), EXIT_CONNECTION) from None


@app.command()
def pretrain(
    out: Annotated[Path | None, typer.Option(help="Generator folder [default: OAL_GENERATOR_ROOT/fmnist-ldm]")] = None,
    preset: Annotated[str, typer.Option(help="Training preset (smoke, demo, full)")] = "demo",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value over the preset, e.g. vae_steps=520; repeatable."),
    ] = None,
) -> None:
    """Pretrain the embedded latent diffusion generator (fmnist-ldm) on Fashion-MNIST."""
    from oal_shared.errors import OALError
    from oal_synth import pretrain as pretraining

    settings = get_settings()
    out_dir = out or Path(settings.generator_root) / "fmnist-ldm"
    try:
        config = pretraining.PretrainConfig.preset(preset)
        config = pretraining.with_overrides(config, **pretraining.parse_overrides(config, set_ or []))
        written = pretraining.pretrain_embedded_generator(out_dir, settings, config, progress=True)
    except OALError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None
    console.print(f"generator written to {written}")


@app.command()
def quality(
    generator_dir: Annotated[Path, typer.Argument(help="An embedded generator folder (oal-synth pretrain's output)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write every number into")],
    shards: Annotated[
        Path | None, typer.Option("--shards", help="A finished job folder of this generator: measure its outliers")
    ] = None,
    benchmark: Annotated[str, typer.Option(help="ID images to compare with")] = "fmnist-osr",
    per_class: Annotated[int, typer.Option(help="Generated images per class (and per real split)")] = 200,
    max_outliers: Annotated[int | None, typer.Option(help="Decode at most this many of the job's outliers")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps (the demo job's)")] = 25,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance (the demo job's)")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of every choice and sample")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
) -> None:
    """Measure the embedded generator: VAE blur, Frechet distance per class, where a job's outliers land."""
    from oal_shared.errors import OALError
    from oal_shared.fsio import atomic_write_bytes
    from oal_synth.quality import QualityConfig, jsonable, measure_quality, quality_tables

    try:
        config = QualityConfig(
            benchmark=benchmark,
            per_class=per_class,
            max_outliers=max_outliers,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            device=device,
        )
        report = measure_quality(generator_dir, shards, config, get_settings(), progress=True)
    except OALError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    for table in quality_tables(report):
        console.print(table)
    console.print(f"quality report written to {out}")


@app.command("register-sd")
def register_sd(
    folder: Annotated[Path, typer.Argument(help="A Stable Diffusion diffusers folder under OAL_GENERATOR_ROOT")],
    generator_id: Annotated[str, typer.Option("--id", help="Id the API lists it under")],
    class_name: Annotated[list[str] | None, typer.Option(help="ID class words, in label order (repeat)")] = None,
) -> None:
    """Describe a Stable Diffusion folder (writes its oal_generator.json) so GET /v1/generators lists it."""
    from oal_shared.errors import OALError
    from oal_shared.paths import ensure_within
    from oal_synth.generators.stable_diffusion import register_stable_diffusion

    settings = get_settings()
    try:
        folder = ensure_within(Path(settings.generator_root), folder)
        info = register_stable_diffusion(folder, generator_id, class_names=class_name or ())
    except OALError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None
    console.print(f"{info.id}: space {info.space}, embed_dim {info.embed_dim}, latent {info.latent_shape}")


@app.command()
def export(
    job_dir: Annotated[Path, typer.Argument(help="A finished job folder (manifest.json + shards), or a job id")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder to write the export into")],
    format: Annotated[str, typer.Option(help="openood (image list, an `oe` split) or imagefolder")] = "openood",
    generator_dir: Annotated[
        Path | None, typer.Option(help="The job's generator folder [default: OAL_GENERATOR_ROOT/<its id>]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Latents decoded at once")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
) -> None:
    """Decode a job's outliers to PNG for other tools (OpenOOD image list or class folders), provenance beside."""
    from oal_shared.errors import OALError
    from oal_shared.paths import ensure_within
    from oal_shared.shards import load_manifest
    from oal_synth.export import export_job

    settings = get_settings()
    try:
        folder = job_dir if job_dir.is_dir() else Path(settings.shard_root) / str(job_dir)
        manifest = load_manifest(folder)
        generator = generator_dir or Path(settings.generator_root) / manifest.generator.id
        generator = ensure_within(Path(settings.generator_root), generator)
        result = export_job(folder, out, format=format, generator_dir=generator, batch_size=batch_size, device=device)
    except OALError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None
    console.print(f"exported {result.count} outliers ({result.format}) to {result.out}")
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


# ---------------------------------------------------------------------------- clients


def build_spec(spec_file: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The spec from a JSON file (if any) with the flags that were given on top; dotted keys nest."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise _fail(f"cannot read spec file {spec_file}: {exc}", EXIT_REFUSED) from None
    if "embeddings" not in spec:
        spec["embeddings"] = {"benchmark": "fmnist-osr"}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = spec
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


@app.command()
def submit(
    spec_file: Annotated[Path | None, typer.Argument(help="Job spec as JSON; flags override its fields")] = None,
    generator: Annotated[str | None, typer.Option(help="Generator id (GET /v1/generators)")] = None,
    num_outliers: Annotated[int | None, typer.Option(help="Outliers in total")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of sampling and diffusion")] = None,
    set_id: Annotated[str | None, typer.Option(help="Uploaded embedding set id (instead of a benchmark)")] = None,
    per_class: Annotated[int | None, typer.Option(help="Benchmark images embedded per class")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Outliers per denoising batch")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Samples per shard")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends")] = True,
    poll: Annotated[float, typer.Option(help="Seconds between status polls")] = 1.0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Submit a synthesis job over REST; prints the manifest path when it finishes."""
    spec = build_spec(
        spec_file,
        {
            "generator": generator,
            "num_outliers": num_outliers,
            "seed": seed,
            "embeddings": {"set_id": set_id} if set_id else None,
            "embeddings.per_class": per_class,
            "diffusion.steps": steps,
            "diffusion.guidance_scale": guidance_scale,
            "diffusion.batch_size": batch_size,
            "shards.max_samples": shard_size,
        },
    )
    try:
        with _client(url, token) as client:
            job = _json_or_fail(client.post("/v1/jobs", json=spec), {202})
            console.print(f"job {job['id']} {job['status']}")
            if wait:
                job = follow_job(client, job, poll)
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the API at {url or _default_url()}: {exc}", EXIT_CONNECTION) from None
    if not wait:
        return
    if job["status"] != "finished":
        message = (job.get("error") or {}).get("message", "no error message")
        raise _fail(f"job {job['id']} ended {job['status']}: {message}", EXIT_REFUSED)
    # Plain echo, never wrapped: scripts read this line.
    typer.echo(job.get("manifest_path") or f"{job.get('output_dir')}/manifest.json")


def follow_job(client: httpx.Client, job: dict, poll: float) -> dict:
    """Poll the job with a tqdm bar of outliers done until it reaches a terminal status."""
    from tqdm import tqdm

    with tqdm(total=job["progress"]["total"] or None, unit="outlier", desc=job["id"][:8], file=sys.stderr) as bar:
        while True:
            bar.total = job["progress"]["total"] or bar.total
            bar.update(job["progress"]["done"] - bar.n)
            bar.set_postfix_str(job["status"])
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll)
            job = _json_or_fail(client.get(f"/v1/jobs/{job['id']}"), {200})


@app.command()
def status(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Show a job: status, progress, shards, error."""
    try:
        with _client(url, token) as client:
            job = _json_or_fail(client.get(f"/v1/jobs/{job_id}"), {200})
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the API at {url or _default_url()}: {exc}", EXIT_CONNECTION) from None
    console.print(job_table(job))


def job_table(job: dict) -> Table:
    table = Table(title=f"job {job['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    progress = job["progress"]
    error = job.get("error")
    rows = [
        ("status", job["status"]),
        ("progress", f"{progress['done']}/{progress['total']} outliers"),
        ("shards", f"{len(job['shards'])} ({sum(s['count'] for s in job['shards'])} samples)"),
        ("generator", (job.get("spec") or {}).get("generator", "?")),
        ("error", f"{error['code']}: {error['message']}" if error else "-"),
        ("output", job.get("output_dir") or "-"),
        ("manifest", job.get("manifest_path") or "-"),
        ("created", job.get("created_at") or "-"),
        ("started", job.get("started_at") or "-"),
        ("ended", job.get("ended_at") or "-"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
