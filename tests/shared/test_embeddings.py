"""Embedding sets: safetensors round trips, a stable content id, and every refusal naming its field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from oal_shared.embeddings import (
    EmbeddingSet,
    embedding_set_from_bytes,
    embedding_set_to_bytes,
    load_embedding_set,
    save_embedding_set,
)
from oal_shared.errors import EmbeddingSetError

CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")


def make_embedding_set(rows: int = 12, dim: int = 8, seed: int = 0) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    return EmbeddingSet(
        embeddings=rng.standard_normal((rows, dim)).astype(np.float32),
        labels=np.arange(rows, dtype=np.int64) % len(CLASS_NAMES),
        space="fmnist-ldm/cond-v1",
        class_names=CLASS_NAMES,
        source="tests: random vectors",
    )


def raw_file_bytes(tensors: dict[str, np.ndarray], **metadata_overrides: str | None) -> bytes:
    """safetensors bytes with valid metadata unless overridden; None drops a key."""
    metadata = {
        "schema_version": "1",
        "space": "fmnist-ldm/cond-v1",
        "class_names": json.dumps(list(CLASS_NAMES)),
        "source": "",
    }
    metadata.update(metadata_overrides)
    return safetensors_save(tensors, metadata={k: v for k, v in metadata.items() if v is not None})


def assert_same_set(a: EmbeddingSet, b: EmbeddingSet) -> None:
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.space, a.class_names, a.source) == (b.space, b.class_names, b.source)
    assert (b.embeddings.dtype, b.labels.dtype) == (np.float32, np.int64)


def test_round_trip_through_file_keeps_every_field_and_leaves_no_temp_file(tmp_path: Path):
    original = make_embedding_set()
    path = save_embedding_set(original, tmp_path / "sets" / "fmnist.safetensors")
    loaded = load_embedding_set(path)
    assert_same_set(original, loaded)
    assert loaded.content_id() == original.content_id()
    assert os.listdir(path.parent) == ["fmnist.safetensors"]


def test_round_trip_through_bytes():
    original = make_embedding_set(rows=7, dim=3)
    data = embedding_set_to_bytes(original)
    loaded = embedding_set_from_bytes(data)
    assert_same_set(original, loaded)
    assert_same_set(original, embedding_set_from_bytes(memoryview(data)))  # as a web framework may hand it
    assert (loaded.dim, loaded.num_classes, len(loaded)) == (3, 6, 7)


def test_for_class_returns_that_class_rows_only():
    es = make_embedding_set(rows=12)
    rows = es.for_class(2)
    np.testing.assert_array_equal(rows, es.embeddings[[2, 8]])
    with pytest.raises(EmbeddingSetError, match="class index"):
        es.for_class(6)


def test_content_id_depends_on_content_only():
    es = make_embedding_set()
    same = make_embedding_set()
    assert es.content_id() == same.content_id()
    assert len(es.content_id()) == 64
    changed_value = es.embeddings.copy()
    changed_value[3, 1] += 1.0
    assert replace(es, embeddings=changed_value).content_id() != es.content_id()
    assert replace(es, space="other/space").content_id() != es.content_id()
    assert replace(es, labels=es.labels[::-1].copy()).content_id() != es.content_id()


def test_content_id_is_the_same_in_a_fresh_process_which_never_imports_torch():
    # safetensors writes metadata in no fixed order, so only a canonical id survives processes.
    code = (
        "import sys, numpy as np\n"
        "import oal_shared.embeddings, oal_shared.shards\n"
        "from tests.shared.test_embeddings import make_embedding_set\n"
        "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, 'heavy import'\n"
        "print(make_embedding_set().content_id())\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == make_embedding_set().content_id()


def test_nan_embedding_is_refused_naming_count_and_row():
    es = make_embedding_set()
    embeddings = es.embeddings.copy()
    embeddings[2, 0] = np.nan
    embeddings[5, 3] = np.inf
    with pytest.raises(EmbeddingSetError, match=r"embeddings: 2 non-finite values \(first at row 2\)"):
        replace(es, embeddings=embeddings)


def test_float64_embeddings_are_refused():
    es = make_embedding_set()
    with pytest.raises(EmbeddingSetError, match="embeddings: expected float32, got float64"):
        replace(es, embeddings=es.embeddings.astype(np.float64))


def test_one_dimensional_embeddings_are_refused():
    es = make_embedding_set()
    with pytest.raises(EmbeddingSetError, match=r"embeddings: expected 2-D \(N, D\), got shape \(96,\)"):
        replace(es, embeddings=es.embeddings.reshape(-1))


def test_empty_embeddings_are_refused():
    es = make_embedding_set()
    with pytest.raises(EmbeddingSetError, match="embeddings: expected N >= 1"):
        replace(es, embeddings=np.zeros((0, 8), np.float32), labels=np.zeros(0, np.int64))


def test_label_count_mismatch_is_refused():
    es = make_embedding_set(rows=6)
    with pytest.raises(EmbeddingSetError, match="labels: 5 labels for 6 embeddings"):
        replace(es, labels=es.labels[:5].copy())


def test_label_out_of_range_is_refused_naming_value_and_row():
    es = make_embedding_set(rows=6)
    labels = es.labels.copy()
    labels[4] = 6
    with pytest.raises(EmbeddingSetError, match=r"labels: values must lie in \[0, 6\).*got 6 at row 4"):
        replace(es, labels=labels)


def test_int32_labels_are_refused():
    es = make_embedding_set()
    with pytest.raises(EmbeddingSetError, match="labels: expected int64, got int32"):
        replace(es, labels=es.labels.astype(np.int32))


def test_blank_space_and_bad_class_names_are_refused():
    es = make_embedding_set()
    with pytest.raises(EmbeddingSetError, match="space: expected a non-empty"):
        replace(es, space="  ")
    with pytest.raises(EmbeddingSetError, match="class_names: entry 1 must be a non-empty string"):
        replace(es, class_names=("a", "", "c", "d", "e", "f"))
    with pytest.raises(EmbeddingSetError, match=r"class_names: names must be distinct, repeated: \['a'\]"):
        replace(es, class_names=("a", "a", "c", "d", "e", "f"))


def test_missing_tensor_is_named():
    es = make_embedding_set()
    data = raw_file_bytes({"embeddings": es.embeddings})
    with pytest.raises(EmbeddingSetError, match="upload: tensor 'labels' is missing"):
        embedding_set_from_bytes(data)


def test_missing_metadata_key_is_named():
    es = make_embedding_set()
    data = raw_file_bytes({"embeddings": es.embeddings, "labels": es.labels}, space=None)
    with pytest.raises(EmbeddingSetError, match="metadata key 'space' is missing"):
        embedding_set_from_bytes(data, name="mine.safetensors")


def test_missing_schema_version_reads_as_the_current_one():
    # The README's upload contract names space, class_names and source; schema_version may be left out.
    es = make_embedding_set()
    data = raw_file_bytes({"embeddings": es.embeddings, "labels": es.labels}, schema_version=None, source="mine")

    loaded = embedding_set_from_bytes(data)

    assert_same_set(loaded, replace(es, source="mine"))
    assert loaded.content_id() == embedding_set_from_bytes(embedding_set_to_bytes(loaded)).content_id()


def test_missing_source_is_named_with_every_required_key():
    es = make_embedding_set()
    data = raw_file_bytes({"embeddings": es.embeddings, "labels": es.labels}, source=None)
    with pytest.raises(EmbeddingSetError, match=r"key 'source' is missing \(required: space, class_names, source\)"):
        embedding_set_from_bytes(data)


def test_unknown_schema_version_is_named():
    es = make_embedding_set()
    data = raw_file_bytes({"embeddings": es.embeddings, "labels": es.labels}, schema_version="2")
    with pytest.raises(EmbeddingSetError, match="schema_version is '2', this version reads 1"):
        embedding_set_from_bytes(data)


def test_wrong_dtype_inside_a_file_names_file_and_field(tmp_path: Path):
    es = make_embedding_set()
    path = tmp_path / "f64.safetensors"
    path.write_bytes(raw_file_bytes({"embeddings": es.embeddings.astype(np.float64), "labels": es.labels}))
    with pytest.raises(EmbeddingSetError, match="f64.safetensors: embeddings: expected float32, got float64"):
        load_embedding_set(path)


def test_truncated_file_names_the_file(tmp_path: Path):
    path = save_embedding_set(make_embedding_set(), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(EmbeddingSetError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_embedding_set(path)


def test_garbage_and_missing_files_are_refused(tmp_path: Path):
    with pytest.raises(EmbeddingSetError, match="upload: not a readable safetensors file"):
        embedding_set_from_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(EmbeddingSetError, match="absent.safetensors: cannot read embedding set"):
        load_embedding_set(tmp_path / "absent.safetensors")
