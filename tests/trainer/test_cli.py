"""`oal-train`: fit, eval, report and config through the real typer app; exit codes and error lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oal_trainer.cli import EXIT_USAGE, app
from oal_trainer.recipes import TrainConfig, resolve_config
from tests.utils.trainer_runs import TINY_RUN

runner = CliRunner()
TINY_SETS = [arg for key, value in TINY_RUN.items() for arg in ("--set", f"{key}={value}")]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_fit_eval_and_report_a_run(oal_env, tmp_path):
    run_dir = tmp_path / "ce"
    result = invoke("fit", "--recipe", "ce", "--out", run_dir, "--preset", "smoke", "--no-progress", *TINY_SETS)
    assert result.exit_code == 0, result.output
    assert "fmnist-osr: energy score" in result.output
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "smoke" and config["train_subset"] == TINY_RUN["train_subset"]

    result = invoke("eval", run_dir, "--eval-subset", "16")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {entry["num_images"] for entry in metrics["datasets"].values()} == {16}

    result = invoke("report", run_dir, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "report.png").is_file()
    assert "ce" in (tmp_path / "report" / "report.md").read_text()


def test_unknown_recipe_exits_2_naming_the_known_ones(tmp_path):
    result = invoke("fit", "--recipe", "oal-magic", "--out", tmp_path / "x")
    assert result.exit_code == EXIT_USAGE
    assert "recipe: unknown 'oal-magic'" in result.output and "oal-energy" in result.output
    assert "Traceback" not in result.output


def test_missing_init_run_exits_2_naming_the_field(oal_env, tmp_path):
    result = invoke(
        "fit", "--recipe", "ce", "--out", tmp_path / "x", *TINY_SETS, "--set", f"init_from={tmp_path / 'gone'}"
    )
    assert result.exit_code == EXIT_USAGE
    assert "init_from:" in result.output and "gone" in result.output


def test_recipe_that_needs_a_teacher_says_so(tmp_path):
    result = invoke("fit", "--recipe", "kd", "--out", tmp_path / "x")
    assert result.exit_code == EXIT_USAGE
    assert "teacher_run: required" in result.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=0.1", "unknown config key 'lrr'; did you mean lr"),
        ("lr=fast", "--set lr=fast: Input should be a valid number"),
        ("club_mode=both", "--set club_mode=both: Input should be 'joint' or 'alternating'"),
        ("epochs", "--set 'epochs': expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    result = invoke("config", "--recipe", "ce", "--set", override)
    assert result.exit_code == EXIT_USAGE
    assert message in result.output


def test_config_layers_apply_in_order(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"recipe": "oal", "epochs": 7, "lr": 0.02}))
    result = invoke(
        "config", "--recipe", "oal", "--preset", "demo", "--config", config_file,
        "--set", "lr=0.03", "--set", "teacher_run=/t", "--set", "shards=/s", "--set", "eval_scorers=energy,msp",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["epochs"] == 7, "the config file wins over the preset"
    assert shown["lr"] == 0.03, "--set wins over the config file"
    assert shown["w_club_emb"] == 0.1 and shown["w_club_latent"] == 0.2, "the oal recipe's weights"
    assert shown["eval_scorers"] == ["energy", "msp"]


def test_config_file_with_an_unknown_key_is_named(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"recipe": "ce", "learning_rate": 0.1}))
    result = invoke("config", "--recipe", "ce", "--config", config_file)
    assert result.exit_code == EXIT_USAGE
    assert "unknown config key 'learning_rate'" in result.output and str(config_file) in result.output


@pytest.mark.parametrize("preset", ["smoke", "demo", "full"])
@pytest.mark.parametrize("recipe", ["ce", "kd", "oal", "oal-energy", "latent-energy", "pixel-oe"])
def test_every_recipe_and_preset_resolves_and_round_trips(recipe, preset, tmp_path):
    needs = ["teacher_run=/t", "init_from=/c", "shards=/s", "generator_dir=/g"]
    config = resolve_config(recipe, preset, overrides=needs)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config.model_dump(mode="json")))
    assert resolve_config(recipe, config_file=saved) == config
    assert TrainConfig.model_validate_json(saved.read_text()) == config


def test_the_installed_entry_point_runs():
    script = Path(sys.executable).parent / "oal-train"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("fit", "eval", "report", "config"):
        assert command in done.stdout


def test_set_values_are_typed_by_their_field():
    config = resolve_config(
        "ce", overrides=["eval_scorers=energy", "augment=false", "epochs=3", "init_from=null", "shards=/a,b"]
    )
    assert config.eval_scorers == ("energy",)
    assert config.augment is False and config.epochs == 3 and config.init_from is None
    assert config.shards == "/a,b", "a path with a comma stays one string"
