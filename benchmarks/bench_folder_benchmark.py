"""A folder benchmark of 50,000 RGB 64x64 PNGs: training memory and ID images per second, streamed vs held.

1. Generates (once, into --cache, with a progress bar) 10 class folders of PNGs for ID train, a
   small ID test and near/far folders, plus two benchmark files: `big.toml` (every train image:
   2.4 GB as float32 tensors, so it streams) and `small.toml` (an image list of --small train
   images, small enough to hold).
2. Fits `ce` for one epoch on big.toml in a child `oal-train fit` process and records its peak RSS
   (getrusage of the waited child: the largest process of the tree, the trainer itself) and, by
   polling /proc every 0.2 s, the peak summed RSS and PSS of the trainer and its DataLoader workers.
3. Fits `ce` for one epoch on small.toml held in memory and streamed (OAL_ID_IN_MEMORY_MAX_MB=0),
   alternating --rounds times; ID images per second over the epoch's training steps, from the
   run's train_log.jsonl (images / sum of interval times).

Targets: trainer peak RSS < 1.5 GB on big.toml; streamed / held images per second >= 0.9.
Prints one JSON object (also written to --out).

    .venv/bin/python benchmarks/bench_folder_benchmark.py --cache artifacts/bench-cache/folder64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

CLASSES = tuple(f"class{c:02d}" for c in range(10))
GENERATOR_VERSION = "1"  # bump when the images change, so an old cache is regenerated


def class_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A class colour and stripe frequency, random phase and light noise: learnable, and PNGs stay small."""
    hue = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256], dtype=np.float32)
    axis = np.arange(size, dtype=np.float32)
    stripes = np.sin(axis[None, :] * (0.15 + 0.05 * label) + rng.uniform(0, 2 * np.pi))  # (1, S)
    image = hue[None, None, :] * (0.6 + 0.3 * stripes[..., None]) + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(cache: Path, images: int, size: int, small: int, seed: int = 0) -> dict:
    """The PNG folders under `cache` (the data root), written once, and the two benchmark files."""
    marker = cache / "complete.json"
    wanted = {"version": GENERATOR_VERSION, "images": images, "size": size, "seed": seed}
    per_class = images // len(CLASSES)
    if not (marker.is_file() and json.loads(marker.read_text()) == wanted):
        _write_pngs(cache, per_class, size, max(images // 100, 100), seed)
        marker.write_text(json.dumps(wanted))
    # The first `small` train images, as an OpenOOD-style image list (relative path, label).
    lines = [
        f"train/{name}/{index:05d}.png {label}"
        for label, name in enumerate(CLASSES)
        for index in range(min(small // len(CLASSES), per_class))
    ]
    (cache / "small_train.txt").write_text("\n".join(lines) + "\n")
    common = '[id_test]\nfolder = "folder64/test"\n[[near]]\nfolder = "folder64/near"\n'
    common += '[[far]]\nfolder = "folder64/far"\n'
    (cache / "big.toml").write_text(f'name = "folder64"\nchannels = 3\n[id_train]\nfolder = "folder64/train"\n{common}')
    small_file = f'name = "folder64-small"\nchannels = 3\nclass_names = {json.dumps(list(CLASSES))}\n'
    small_file += f'[id_train]\nlist = "small_train.txt"\nroot = "folder64"\n{common}'
    (cache / "small.toml").write_text(small_file)
    return {**wanted, "small": len(lines)}


def _write_pngs(cache: Path, per_class: int, size: int, ood: int, seed: int) -> None:
    if cache.exists():
        shutil.rmtree(cache)
    rng = np.random.default_rng(seed)
    root = cache / "folder64"
    test_per_class = max(per_class // 100, 10)
    total = (per_class + test_per_class) * len(CLASSES) + 2 * ood
    with tqdm(total=total, desc=f"writing PNGs into {root}", unit="img") as bar:
        for split, count in (("train", per_class), ("test", test_per_class)):
            for label, name in enumerate(CLASSES):
                folder = root / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    Image.fromarray(class_image(rng, label, size)).save(folder / f"{index:05d}.png", compress_level=1)
                    bar.update()
        for kind in ("near", "far"):
            (root / kind).mkdir()
            for index in range(ood):
                if kind == "near":  # another palette, same kind of stripes
                    image = 255 - class_image(rng, index % len(CLASSES), size)
                else:
                    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / kind / f"{index:05d}.png", compress_level=1)
                bar.update()


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            found += [int(child) for child in text]
    except OSError:
        return found
    return found + [grandchild for child in found for grandchild in _children(child)]


def _kb(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Polls the summed RSS and PSS (kB) of a process and its descendants until it exits."""

    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_rss_kb = self.peak_pss_kb = self.peak_workers = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = [self.pid, *_children(self.pid)]
            rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
            self.peak_workers = max(self.peak_workers, len(pids) - 1)
            time.sleep(self.every_s)


def fit_once(bench_file: str, cache: Path, out: Path, args: argparse.Namespace, env_extra: dict) -> dict:
    """One `oal-train fit` child process: its memory, images per second and the loader it chose."""
    command = [
        sys.executable,
        "-m",
        "oal_trainer.cli",
        "fit",
        "--recipe",
        "ce",
        "--out",
        str(out),
        *("--set", f"benchmark={bench_file}"),
        *("--set", f"model={args.model}"),
        *("--set", "epochs=1"),
        *("--set", f"batch_size={args.batch_size}"),
        *("--set", f"threads={args.threads}"),
        *("--set", "log_interval=10"),
        *("--set", "eval_subset=200"),
        *("--set", f"eval_batch_size={args.batch_size}"),
    ]
    env = {**os.environ, "OAL_DATA_DIR": str(cache), "OAL_ARTIFACT_DIR": str(out.parent / "artifacts"), **env_extra}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(child.pid)
    memory.start()
    output, _ = child.communicate()
    memory.done.set()
    memory.join()
    if child.returncode != 0:
        raise SystemExit(f"fit failed ({child.returncode}):\n{output[-4000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    seconds = 0.0
    previous_step = 0
    for record in records:  # each record: mean rate over the steps since the previous one
        images = (record["step"] - previous_step) * args.batch_size
        seconds += images / record["samples_per_s"]
        previous_step = record["step"]
    choice = next((line for line in output.splitlines() if "ID train" in line and "float32 tensors" in line), "")
    return {
        "benchmark": bench_file,
        "env": env_extra,
        "train_images": run["train_images"],
        "id_images_per_s": round(previous_step * args.batch_size / seconds, 1),
        "loader": "streamed" if "streamed" in choice else "held",
        "loader_log": choice.split("INFO ")[-1],
        # getrusage's figure is exact only when this child's largest process outgrew every earlier child.
        "trainer_peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb > before else None,
        "tree_peak_rss_mb": round(memory.peak_rss_kb / 1024, 1),
        "tree_peak_pss_mb": round(memory.peak_pss_kb / 1024, 1),
        "loader_workers_seen": memory.peak_workers,
        "wall_s": round(time.perf_counter() - started, 1),
        "seconds": run["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("artifacts/bench-cache/folder64"))
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--small", type=int, default=2_500, help="ID train images of the held/streamed comparison")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="resnet_tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-big", action="store_true", help="only the held/streamed comparison")
    args = parser.parse_args()

    started = time.perf_counter()
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "complete": False,
    }
    data = generate(args.cache.resolve(), args.images, args.size, args.small)
    result["data"] = {**data, "float32_gb": round(args.images * 3 * args.size**2 * 4 / 1e9, 2)}
    result["generate_s"] = round(time.perf_counter() - started, 1)
    cache = args.cache.resolve()
    comparison: dict[str, list] = {"held": [], "streamed": []}
    result["small"] = comparison
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        if not args.skip_big:
            result["big"] = fit_once("big.toml", cache, Path(tmp) / "big", args, {})  # default limit: it streams
            _write(result, args.out)
        for round_index in range(args.rounds):  # alternating, so a change in machine load hits both alike
            for mode, limit in (("held", "4096"), ("streamed", "0")):
                out = Path(tmp) / f"small-{mode}-{round_index}"
                comparison[mode].append(fit_once("small.toml", cache, out, args, {"OAL_ID_IN_MEMORY_MAX_MB": limit}))
                _write(result, args.out)
    held = statistics.median(r["id_images_per_s"] for r in comparison["held"])
    streamed = statistics.median(r["id_images_per_s"] for r in comparison["streamed"])
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["small_id_images_per_s"] = {"held_median": held, "streamed_median": streamed}
    result["streamed_over_held"] = round(streamed / held, 3)
    big_rss = result.get("big", {}).get("trainer_peak_rss_mb")
    result["targets"] = {
        "trainer_peak_rss_below_1.5gb": big_rss is not None and big_rss < 1536,
        "streamed_over_held_at_least_0.9": streamed / held >= 0.9,
    }
    result["complete"] = True
    _write(result, args.out)
    print(json.dumps(result, indent=2))  # noqa: T201 - a script's result


def _write(result: dict, out: Path | None) -> None:
    """The result so far (a long run killed midway keeps what it measured)."""
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
