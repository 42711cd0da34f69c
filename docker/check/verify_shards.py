#!/usr/bin/env python3
"""Check a job's shards as copied out of the `shards` volume against its manifest, on the host.

    verify_shards.py FOLDER MANIFEST_JSON EXPECTED_COUNT

FOLDER holds outliers-*.tar (copied out of the container); MANIFEST_JSON is what
GET /v1/jobs/<id>/manifest answered. Checked: the folder holds exactly the shards the manifest lists,
each with the manifest's byte size and sha256; each shard's samples (tar members grouped by the key
before the first dot, as WebDataset groups them) number what the manifest says and each has all four
members; no key appears twice across the shards; the total equals EXPECTED_COUNT (the job's
num_outliers) and the manifest's num_samples. Standard library only: it runs on a host with no venv.
Prints one summary line; exits 1 with the first problem found.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

SAMPLE_MEMBERS = {"latent.npy", "emb.npy", "cls", "json"}  # docs/METHOD.md, Contracts


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def samples_in(path: Path) -> dict[str, set[str]]:
    """Sample key -> member suffixes, read from the tar's member names."""
    samples: dict[str, set[str]] = defaultdict(set)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                key, _, suffix = member.name.partition(".")
                samples[key].add(suffix)
    return samples


def problems(folder: Path, manifest: dict, expected: int) -> tuple[list[str], int, int]:
    found: list[str] = []
    listed = {entry["name"]: entry for entry in manifest["shards"]}
    on_disk = {path.name for path in folder.glob("outliers-*.tar")}
    if on_disk != set(listed):
        found.append(f"shards on disk {sorted(on_disk)} differ from the manifest's {sorted(listed)}")
    seen: set[str] = set()
    total = 0
    for name in sorted(set(listed) & on_disk):
        entry, path = listed[name], folder / name
        if path.stat().st_size != entry["bytes"]:
            found.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            found.append(f"{name}: sha256 {digest}, the manifest says {entry['sha256']}")
        samples = samples_in(path)
        if len(samples) != entry["count"]:
            found.append(f"{name}: {len(samples)} samples, the manifest says {entry['count']}")
        incomplete = sorted(key for key, members in samples.items() if members != SAMPLE_MEMBERS)
        if incomplete:
            found.append(f"{name}: samples {incomplete[:3]} lack some of {sorted(SAMPLE_MEMBERS)}")
        repeated = seen & set(samples)
        if repeated:
            found.append(f"{name}: keys {sorted(repeated)[:3]} already in an earlier shard")
        seen |= set(samples)
        total += len(samples)
    if total != expected:
        found.append(f"{total} samples in all, the job asked for {expected}")
    if manifest.get("num_samples") != total:
        found.append(f"manifest num_samples {manifest.get('num_samples')} but the shards hold {total}")
    return found, total, len(on_disk)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write(f"usage: {__doc__.strip().splitlines()[2].strip()}\n")
        return 2
    folder, manifest_path, expected = Path(argv[0]), Path(argv[1]), int(argv[2])
    manifest = json.loads(manifest_path.read_text())
    found, total, shard_count = problems(folder, manifest, expected)
    if found:
        for problem in found:
            sys.stderr.write(f"shards: {problem}\n")
        return 1
    sys.stdout.write(
        f"shards: {shard_count} shards, {total} samples, sizes and sha256 match the manifest, no key twice\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
