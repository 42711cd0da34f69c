"""Training-step cost per recipe, side by side, with where each step's time goes.

Every recipe is built with the trainer's own run builder (`oal_trainer.run.build_run`) on the
embedded benchmark slice, the same student, batch size and thread count, and stepped as the fit
loop steps it (objective, one backward, one SGD and one schedule step per trained part). Outliers
come from real test shards with the embedded generator's shapes (4x8x8 latents, 64-d embeddings),
decoded by a tiny random VAE for pixel-oe. The variants are interleaved: each round runs a few
steps of every variant in turn, so a load drift on the shared machine hits them all alike; the
per-step figure is the median over rounds.

On a shared machine wall time swings with the other processes' load; `--clock cpu` times every
section with the process's CPU time instead (time.process_time: with `--threads 1` that is the
work the step did, whatever else runs). A step is split into timed sections (plain timers: CPU
only; on a GPU each section would need a synchronize):

- data: the ID batch from the loader, augmentation, outlier fetch (Run.batches, less the two below);
- teacher: the teacher's logits and features (a cache lookup, or a forward with --teacher-mode live);
- decode: latents -> images for pixel-oe (per_step; a cache lookup with precompute);
- student: the student's forward (ID images, plus decoded outliers for pixel-oe);
- club: the CLUB bounds and q-fits (forward only; their backward is in `backward`);
- losses: the rest of the objective (CE, KD, energy/OE terms);
- backward: backward pass, optimiser and schedule steps.

The execution options of the fit step multiply the variants: `--amp off bf16 fp16`, `--channels-last
on off`, `--compile off on` (docs/GPU.md), each recipe in every combination, all interleaved as above;
ratios are to the first variant (the baseline). A variant's warm-up time is reported too: with compile
on it is mostly compilation. `--device cuda` runs on the GPU; then every clock read is preceded by
torch.cuda.synchronize, so a section's time is the device's, and the peak allocated GPU memory while
each variant stepped is recorded.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_recipes.py --json artifacts/bench/recipes.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_recipes.py --threads 1 --clock cpu  # on a loaded machine
    PYTHONPATH=. .venv/bin/python benchmarks/bench_recipes.py --recipes ce oal --amp off bf16 --compile off on
    PYTHONPATH=. .venv/bin/python benchmarks/bench_recipes.py --device cuda --batch 512 --amp off bf16 fp16
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.utils: test shards, tiny VAE

from oal_shared.settings import Settings  # noqa: E402
from oal_trainer.fit import fit  # noqa: E402
from oal_trainer.precision import Precision, autocast_each, check_amp_device  # noqa: E402
from oal_trainer.recipes import resolve_config  # noqa: E402
from oal_trainer.run import Run, build_run  # noqa: E402
from tests.utils.trainer_runs import write_test_shards, write_tiny_vae  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock
SECTIONS = ("data", "teacher", "decode", "student", "club", "losses", "backward")
# name -> (recipe, extra config keys)
VARIANTS = {
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "oal": ("oal", {}),
    "oal-energy": ("oal-energy", {}),
    "pixel-oe per_step": ("pixel-oe", {"pixel_decode": "per_step"}),
    "pixel-oe precompute": ("pixel-oe", {"pixel_decode": "precompute"}),
}


class Sections:
    """Seconds per named section of the current step, by wrapping the callables a step goes through."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += clock() - started

        return timed

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


def instrument(run: Run, sections: Sections) -> None:
    """Time the teacher, the decoder and the objective's parts of `run` (instance attributes only)."""
    if run.teacher is not None:
        object.__setattr__(run.teacher, "outputs", sections.wrap("teacher", run.teacher.outputs))
    if run.pixels is not None:
        object.__setattr__(run.pixels, "images", sections.wrap("decode", run.pixels.images))
    objective = run.objective
    objective._student = sections.wrap("student", objective._student)
    objective._micl = sections.wrap("club", objective._micl)


def cuda_clock(base):
    """`base` read after the device has finished what was queued (CUDA runs asynchronously)."""

    def read() -> float:
        torch.cuda.synchronize()
        return base()

    return read


class Stepper:
    """One variant's run, stepped as the fit loop steps it (oal_trainer.fit.train_epoch: batches and
    objective under the run's autocast, backward and steps through its Precision); batches restart
    each epoch."""

    def __init__(self, run: Run):
        self.run = run
        check_amp_device(run.config.amp, run.ctx.device)  # as fit() does: fp16 is refused on the CPU
        self.precision = Precision(run.config.amp, run.ctx.device)
        self.sections = Sections()
        instrument(run, self.sections)
        self.epoch = 0
        self.batches = autocast_each(run.batches(0), self.precision)
        run.objective.train()

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = autocast_each(self.run.batches(self.epoch), self.precision)
            return next(self.batches)

    def step(self) -> dict[str, float]:
        run = self.run
        started = clock()
        batch = self._next_batch()
        fetched = clock()
        with self.precision.autocast():
            losses = run.objective(batch)
        computed = clock()
        for optimizer in run.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.precision.backward(losses.to_backward)
        self.precision.step(run.optimizers.values())
        for scheduler in run.schedulers.values():
            scheduler.step()
        done = clock()
        parts = self.sections.take()
        inside_data = parts.get("teacher", 0.0) + parts.get("decode", 0.0)
        inside_objective = parts.get("student", 0.0) + parts.get("club", 0.0)
        # pixel-oe's decode of a precomputed cache happens in the data step too; both are split out.
        return {
            **{name: parts.get(name, 0.0) for name in ("teacher", "decode", "student", "club")},
            "data": fetched - started - inside_data,
            "losses": computed - fetched - inside_objective,
            "backward": done - computed,
            "total": done - started,
        }


def build_world(root: Path, args) -> tuple[Settings, dict]:
    settings = Settings(artifact_dir=root / "artifacts", torch_threads=args.threads)
    generator = write_tiny_vae(root / "generator")
    shards = write_test_shards(root / "shards", num_shards=2, per_shard=4 * args.batch, generator_dir=generator)
    common = {"model": args.model, "train_subset": args.train_subset, "threads": args.threads, "evaluate": False}
    common["device"] = args.device
    teacher = resolve_config("ce", overrides=[f"{k}={v}" for k, v in {**common, "epochs": 1}.items()])
    fit(teacher, root / "teacher", settings=settings)
    inputs = {"teacher_run": root / "teacher", "init_from": root / "teacher", "shards": shards}
    inputs["generator_dir"] = generator
    return settings, {**common, **inputs, "batch_size": args.batch, "epochs": 1000}


def variants(args) -> dict[str, tuple[str, dict]]:
    """name -> (recipe, extra config keys): every recipe in every combination of the execution options.

    An option given one value is left out of the names (so the default run keeps the plain recipe names)."""
    options = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    out = {}
    for name in args.recipes:
        recipe, extra = VARIANTS[name]
        for values in itertools.product(*options.values()):
            chosen = dict(zip(options, values, strict=True))
            label = " ".join(
                f"{'cl' if key == 'channels_last' else key}={value}"
                for key, value in chosen.items()
                if len(options[key]) > 1
            )
            config = {**extra, **{key: value if key == "amp" else ON_OFF[value] for key, value in chosen.items()}}
            out[f"{name} {label}".strip()] = (recipe, config)
    return out


ON_OFF = {"on": True, "off": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_small", help="student (and teacher) architecture")
    parser.add_argument("--batch", type=int, default=128, help="ID images per step (the demo's)")
    parser.add_argument("--train-subset", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all variants")
    parser.add_argument("--steps", type=int, default=3, help="steps of each variant per round (after 2 warm-up)")
    parser.add_argument("--teacher-mode", choices=("cache", "live"), default="cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the run's `device`)")
    parser.add_argument("--recipes", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--amp", nargs="+", choices=("off", "bf16", "fp16"), default=["off"])
    parser.add_argument("--channels-last", nargs="+", choices=("on", "off"), default=["on"])
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda:
        if args.clock == "cpu":
            parser.error("--clock cpu measures the host, not the GPU: use --clock wall with --device cuda")
        clock = cuda_clock(clock)
    torch.set_num_threads(args.threads)
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        root = Path(tmp)
        settings, common = build_world(root, args)
        steppers, warmup_s = {}, {}
        for name, (recipe, extra) in variants(args).items():
            values = {**common, **extra}
            if recipe != "ce":
                values["teacher_mode"] = args.teacher_mode
            else:
                values.pop("teacher_run"), values.pop("init_from")
            config = resolve_config(recipe, overrides=[f"{k}={v}" for k, v in values.items()])
            steppers[name] = Stepper(build_run(config, root / name.replace(" ", "-").replace("=", "-"), settings))
        for name, stepper in steppers.items():  # warm-up: first calls allocate, choose kernels, compile
            # Wall time whatever --clock says: inductor compiles in worker processes, outside our CPU time.
            started = time.perf_counter()
            stepper.step(), stepper.step()
            clock()  # on CUDA: synchronise before reading the wall clock
            warmup_s[name] = time.perf_counter() - started
        per_round: dict[str, list[dict[str, float]]] = {name: [] for name in steppers}
        peak_gib: dict[str, float] = dict.fromkeys(steppers, 0.0)
        names = list(steppers)
        for index in range(args.rounds):
            # Each round starts at the next variant, so no variant always runs right after another.
            for name in names[index % len(names) :] + names[: index % len(names)]:
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                steps = [steppers[name].step() for _ in range(args.steps)]
                per_round[name].append({key: statistics.fmean(s[key] for s in steps) for key in steps[0]})
                if on_cuda:
                    peak_gib[name] = max(peak_gib[name], torch.cuda.max_memory_allocated() / 2**30)
        skipped = {name: stepper.precision.skipped_steps for name, stepper in steppers.items()}
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    results = {}
    for name, rounds in per_round.items():
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        results[name] = {
            "step_s": median["total"],
            "step_s_rounds": [r["total"] for r in rounds],
            "sections_s": {k: median[k] for k in SECTIONS},
            "warmup_s": warmup_s[name],  # the first two steps: allocation, kernel choice, compilation
            "amp_skipped_steps": skipped[name],
            "peak_gpu_gib": peak_gib[name] if on_cuda else None,
        }
    baseline = names[0]
    base_rounds = results[baseline]["step_s_rounds"]
    for row in results.values():
        row["ratio_to_baseline"] = row["step_s"] / results[baseline]["step_s"]
        # The same ratio round by round (neighbouring runs share the load): its spread shows the noise.
        row["ratio_to_baseline_rounds"] = [a / b for a, b in zip(row["step_s_rounds"], base_rounds, strict=True)]
        if baseline == "ce":  # the default run: the name earlier versions of this file wrote
            row["ratio_to_ce"], row["ratio_to_ce_rounds"] = row["ratio_to_baseline"], row["ratio_to_baseline_rounds"]
        row["dominant"] = max(row["sections_s"], key=row["sections_s"].get)

    width = max(20, *(len(name) for name in results))
    header = f"{'variant':<{width}} {'s/step':>7} {'x base':>6} {'warmup':>7} " + " ".join(f"{s:>8}" for s in SECTIONS)
    load = f"load {' '.join(load_before)} -> {' '.join(load_after)}"
    print(f"{args.model}, batch {args.batch}, {args.device}, {args.threads} threads, {args.clock} clock, "
          f"teacher {args.teacher_mode}; baseline {baseline!r}; {load}")  # fmt: skip
    print(header)
    for name, row in results.items():
        cells = " ".join(f"{row['sections_s'][s] * 1000:8.1f}" for s in SECTIONS)
        spread = f"{min(row['ratio_to_baseline_rounds']):.2f}-{max(row['ratio_to_baseline_rounds']):.2f}"
        print(f"{name:<{width}} {row['step_s']:7.3f} {row['ratio_to_baseline']:6.2f} {row['warmup_s']:6.1f}s "
              f"{cells}  (rounds {spread})")  # fmt: skip
    print("(sections in ms per step; medians over rounds; warmup: the first two steps)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
            "steps_per_round": args.steps, "teacher_mode": args.teacher_mode, "clock": args.clock,
            "device": args.device, "torch": torch.__version__, "baseline": baseline,
            "cuda_device": torch.cuda.get_device_name() if on_cuda else None,
            "loadavg_before": load_before, "loadavg_after": load_after, "variants": results,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
