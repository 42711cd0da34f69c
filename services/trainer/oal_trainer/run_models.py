"""The student and the teacher a run starts from: built by name, weights from a run dir or a file.

The student is built under the run's seed at the benchmark's image size, then started from a finished
run (`init_from`) or a weights file (`init_weights`, e.g. torchvision's ImageNet ResNet saved as
safetensors: a head of another size is re-initialised). The teacher is a finished run (`teacher_run`)
or a weights file of `teacher_model` (`teacher_weights`), whose head must fit: it has to know this
benchmark's classes. docs/TRAINER.md, Your own model.

With `compile`, the student (and a live teacher) is compiled in place (`nn.Module.compile`): the
module keeps its own state dict keys (no `_orig_mod.` prefix of `torch.compile(module)`), so
checkpoints and weights load into an uncompiled model, and a run resumes compiled or not.
Compilation happens at the first forward of each new shape or mode (docs/GPU.md: its cost).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oal_shared.data.benchmark import Benchmark
from oal_shared.errors import ConfigError
from oal_trainer.models import build_model
from oal_trainer.recipes import TrainConfig
from oal_trainer.teacher import LoadedRun, frozen_teacher, load_run_model, load_teacher, load_weights_model
from oal_trainer.weights import load_weights_file


def build_student(
    config: TrainConfig, benchmark: Benchmark, device: torch.device
) -> tuple[nn.Module, LoadedRun | None]:
    """The student on `device` and what it started from (None: fresh under the seed)."""
    size, classes, channels = benchmark.image_size, benchmark.num_classes, benchmark.in_channels
    student = build_model(config.model, classes, channels, size, config.model_stem)
    init_run = None
    if config.init_from:
        init_run = load_run_model(Path(config.init_from), "init_from", classes, channels, size)
        if (init_run.model_name, init_run.stem) != (config.model, config.model_stem):
            raise ConfigError(
                f"init_from: {config.init_from} holds a {init_run.model_name!r} model (model_stem {init_run.stem}), "
                f"the config trains {config.model!r} (model_stem {config.model_stem}); "
                f"set model={init_run.model_name} model_stem={init_run.stem} or pick another run"
            )
        student.load_state_dict(init_run.model.state_dict())
    elif config.init_weights:
        # A head of another size (ImageNet's 1000 classes) is re-initialised: the student learns this benchmark's.
        fit = load_weights_file(
            student,
            Path(config.init_weights),
            "init_weights",
            allow_pickle=config.allow_pickle_weights,
            reinit_head=True,
        )
        init_run = LoadedRun(fit.path, student, config.model, "", fit.sha256, stem=config.model_stem)
    student = student.to(device)
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if config.compile:
        compile_in_place(student, "compile")
    return student, init_run


def compile_in_place(module: nn.Module, field: str) -> None:
    """`module.compile()` (inductor), refused up front where it cannot work, naming the config field."""
    import shutil

    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        raise ConfigError(
            f"{field}: torch.compile needs a C/C++ compiler on the PATH (inductor builds its kernels with it); "
            f"install gcc or set {field}=false"
        )
    module.compile()


def teacher_model(config: TrainConfig, benchmark: Benchmark) -> LoadedRun:
    """The frozen teacher (on the CPU): a finished run dir, or a weights file of `teacher_model`."""
    size, classes, channels = benchmark.image_size, benchmark.num_classes, benchmark.in_channels
    if config.teacher_weights:
        loaded = load_weights_model(
            Path(config.teacher_weights),
            "teacher_weights",
            config.teacher_model,  # type: ignore[arg-type]  # the config requires it with teacher_weights
            num_classes=classes,
            in_channels=channels,
            image_size=size,
            stem=config.teacher_stem,
            allow_pickle=config.allow_pickle_weights,
        )
        loaded = frozen_teacher(loaded)
    else:
        loaded = load_teacher(Path(config.teacher_run), classes, channels, size)  # type: ignore[arg-type]
    # A live teacher runs a forward every step; a cached one runs once over the set, not worth compiling.
    if config.compile and config.teacher_mode == "live":
        compile_in_place(loaded.model, "compile")
    return loaded
