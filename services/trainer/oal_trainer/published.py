"""Published OpenOOD v1.5 results that `oal-train compare` puts beside our runs, each with its source.

Every number below is copied from the OpenOOD repository's leaderboard data files, the source of
the OpenOOD v1.5 leaderboard (https://zjysteven.github.io/OpenOOD/):

    https://github.com/Jingkang50/OpenOOD/blob/03db2d83430786497a277a10fe2dc1f54b92cb36/results/cifar10.csv
    https://github.com/Jingkang50/OpenOOD/blob/03db2d83430786497a277a10fe2dc1f54b92cb36/results/cifar100.csv

Values are in %, mean ± standard deviation over OpenOOD's three training seeds, ResNet-18 on the
OpenOOD v1.5 splits of CIFAR-10/100 (near-OOD: CIFAR-100/10 and TinyImageNet; far-OOD: MNIST,
SVHN, Textures, Places365), AUROC with OOD as positive. `None` is a cell the leaderboard leaves
empty ("/": NPOS reports no ID accuracy there). Rows are added here only with a source; a method
whose numbers could not be found is left out rather than estimated.
"""

from __future__ import annotations

from dataclasses import dataclass

OPENOOD_COMMIT = "03db2d83430786497a277a10fe2dc1f54b92cb36"
_SOURCE = "OpenOOD v1.5 leaderboard, results/{benchmark}.csv at Jingkang50/OpenOOD@" + OPENOOD_COMMIT[:7]
SOURCE_URLS = {
    benchmark: f"https://github.com/Jingkang50/OpenOOD/blob/{OPENOOD_COMMIT}/results/{benchmark}.csv"
    for benchmark in ("cifar10", "cifar100")
}


@dataclass(frozen=True)
class Measure:
    mean: float  # %
    std: float | None  # %, over seeds; None for a single run

    def text(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class PublishedRow:
    benchmark: str  # "cifar10" | "cifar100" (OpenOOD v1.5 splits)
    training: str  # OpenOOD's "Training" column
    postprocessor: str  # the score
    near_auroc: Measure
    far_auroc: Measure
    id_accuracy: Measure | None
    outlier_data: bool  # trained with real outlier data (OE's TinyImageNet-597)
    note: str  # OpenOOD's "Additional_Description"

    @property
    def source(self) -> str:
        return _SOURCE.format(benchmark=self.benchmark)

    @property
    def url(self) -> str:
        return SOURCE_URLS[self.benchmark]


def _row(benchmark, training, postprocessor, near, far, accuracy, outlier_data=False, note="100 epochs"):
    return PublishedRow(
        benchmark,
        training,
        postprocessor,
        Measure(*near),
        Measure(*far),
        Measure(*accuracy) if accuracy is not None else None,
        outlier_data,
        note,
    )


# Training, Postprocessor, Near-OOD_AUROC, Far-OOD_AUROC, ID_Accuracy, as in the files above.
PUBLISHED: tuple[PublishedRow, ...] = (
    _row("cifar10", "CrossEntropy", "EBO", (87.58, 0.46), (91.21, 0.92), (95.06, 0.30)),
    _row("cifar10", "OAL", "EBO", (93.15, 0.16), (96.21, 0.25), (95.01, 0.14), note="100 epochs; 224x224"),
    _row("cifar10", "OE", "MSP", (94.82, 0.21), (96.00, 0.13), (94.63, 0.26), outlier_data=True),
    _row("cifar10", "VOS", "EBO", (87.70, 0.48), (90.83, 0.92), (94.31, 0.64)),
    _row("cifar10", "NPOS", "KNN", (89.78, 0.33), (94.07, 0.49), None),
    _row("cifar100", "CrossEntropy", "EBO", (80.91, 0.08), (79.77, 0.61), (77.25, 0.10)),
    _row("cifar100", "OAL", "EBO", (81.73, 0.58), (85.40, 0.67), (77.09, 0.43), note="100 epochs; 224x224"),
    _row("cifar100", "OE", "MSP", (88.30, 0.10), (81.41, 1.49), (76.84, 0.42), outlier_data=True),
    _row("cifar100", "VOS", "EBO", (80.93, 0.29), (81.32, 0.09), (77.20, 0.10)),
    _row("cifar100", "NPOS", "KNN", (78.35, 0.37), (82.29, 1.55), None),
)

PUBLISHED_BENCHMARKS = ("cifar10", "cifar100")
