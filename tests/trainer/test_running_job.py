"""A trainer pointed at a synthesis job that has not finished is refused, saying why."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from oal_shared.shards import MANIFEST_NAME
from oal_trainer.cli import EXIT_ERROR, app
from tests.utils.trainer_runs import TINY_RUN, write_test_shards

TINY_SETS = [arg for key, value in TINY_RUN.items() for arg in ("--set", f"{key}={value}")]


def test_fit_on_a_job_still_running_exits_1_saying_so(oal_env, tmp_path):
    # What a running (or crashed) job leaves: whole shards under their final names, no manifest yet.
    job = write_test_shards(tmp_path / "job", num_shards=2, per_shard=8)
    (job / MANIFEST_NAME).unlink()
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["fit", "--recipe", "ce", "--out", str(run_dir), "--no-progress", *TINY_SETS]
        + ["--set", "w_energy=0.1", "--set", f"shards={job}"],
    )
    assert result.exit_code == EXIT_ERROR, result.output
    output = " ".join(result.output.split())  # the error line may wrap
    assert re.search(rf"{re.escape(str(job))}: 2 shards but no manifest.json: .*still running", output), output
    assert "Traceback" not in result.output
    assert not (run_dir / "model.safetensors").exists()
