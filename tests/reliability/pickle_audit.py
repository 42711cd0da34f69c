"""A static audit for pickle loading, over Python source (ast, no imports of the audited code).

What counts as loading a pickle:
- importing pickle, cPickle, _pickle, dill, cloudpickle, joblib or shelve at all;
- `torch.load(...)` without `weights_only=True`;
- `np.load` / `numpy.load` / `np.lib.format.read_array` without `allow_pickle=False`;
- `pandas.read_pickle` / `pd.read_pickle`;
- `X.from_pretrained(...)` where X was imported from diffusers or transformers, without
  `use_safetensors=True` (else a folder holding only `.bin` weights is unpickled);
- an rq queue, job, worker or registry built without `serializer=` (rq's default is pickle);
- webdataset's automatic decoding (`wds.decode`, `autodecode`, `WebDataset(...).decode`), whose
  default handlers unpickle `.pyd` / `.pickle` members.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PICKLE_MODULES = frozenset({"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"})
NUMPY_NAMES = frozenset({"np", "numpy"})
RQ_SERIALIZING = frozenset(
    {
        "Queue",
        "Job",
        "Worker",
        "SimpleWorker",
        "SpawnWorker",
        "StartedJobRegistry",
        "FinishedJobRegistry",
        "FailedJobRegistry",
        "DeferredJobRegistry",
        "ScheduledJobRegistry",
        "CanceledJobRegistry",
    }
)
RQ_JOB_LOADERS = frozenset({"fetch", "fetch_many", "create"})
WEBDATASET_PIPELINES = frozenset({"WebDataset", "DataPipeline", "WebLoader"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def dotted(node: ast.AST) -> str:
    """`a.b.c` for Name/Attribute chains, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value for kw in call.keywords
    )


def has_keyword(call: ast.Call, name: str) -> bool:
    return any(kw.arg == name for kw in call.keywords)


class _Auditor(ast.NodeVisitor):
    def __init__(self, path: str):
        self.path = path
        self.findings: list[Finding] = []
        self.rq_names: set[str] = set()
        self.hub_names: set[str] = set()  # classes imported from diffusers / transformers

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {alias.name}")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        root = (node.module or "").split(".")[0]
        if root in PICKLE_MODULES:
            self.flag(node, f"imports from {node.module}")
        for alias in node.names:
            local = alias.asname or alias.name
            if root == "rq" and alias.name in RQ_SERIALIZING:
                self.rq_names.add(local)
            if root in {"diffusers", "transformers"}:
                self.hub_names.add(local)
            if root == "webdataset" and alias.name == "autodecode":
                self.flag(node, "imports webdataset.autodecode (its default handlers unpickle)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = dotted(node.func)
        head, _, last = name.rpartition(".")
        if name == "torch.load" and not keyword_is(node, "weights_only", True):
            self.flag(node, "torch.load without weights_only=True")
        if (name in {f"{n}.load" for n in NUMPY_NAMES} or name.endswith("lib.format.read_array")) and not keyword_is(
            node, "allow_pickle", False
        ):
            self.flag(node, f"{name} without allow_pickle=False")
        if last == "read_pickle":
            self.flag(node, f"{name} reads a pickle")
        if last == "from_pretrained" and head in self.hub_names and not keyword_is(node, "use_safetensors", True):
            self.flag(node, f"{name} without use_safetensors=True")
        rq_built = name in self.rq_names or (head in self.rq_names and last in RQ_JOB_LOADERS)
        if rq_built and not has_keyword(node, "serializer"):
            self.flag(node, f"{name} without serializer= (rq's default serializer is pickle)")
        if name in {"wds.decode", "webdataset.decode"} or "autodecode" in name.split("."):
            self.flag(node, f"{name}: webdataset's default decoders unpickle .pyd/.pickle members")
        # dotted() is "" for a call chain, so look at the attribute itself: WebDataset(...).decode(...)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "decode" and isinstance(func.value, ast.Call):
            if dotted(func.value.func).rpartition(".")[2] in WEBDATASET_PIPELINES:
                self.flag(node, "WebDataset(...).decode: the default decoders unpickle .pyd/.pickle members")
        self.generic_visit(node)


def audit_source(source: str, path: str = "<source>") -> list[Finding]:
    auditor = _Auditor(path)
    auditor.visit(ast.parse(source, filename=path))
    return auditor.findings


def audit_tree(root: Path, folders: tuple[str, ...], skip: tuple[str, ...] = ()) -> tuple[list[Finding], int]:
    """Findings over every .py under `root/<folder>`, and how many files were read."""
    findings: list[Finding] = []
    count = 0
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative in skip:
                continue
            count += 1
            findings += audit_source(path.read_text(encoding="utf-8"), relative)
    return findings, count
