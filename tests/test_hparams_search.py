"""hparams_search=optuna: a search through Hydra's Optuna sweeper, an optional install. The searches run only where
the sweeper is installed (`pip install hydra-optuna-sweeper==1.3.0 optuna==2.10.1`) and skip, saying so,
elsewhere, as in CI, which installs requirements.txt alone; the one-line refusals run everywhere."""

import json

import pytest
import yaml
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

import training
from tests.helpers import TRAIN_PY, events, run_python
from training import plugins
from training.loop import NonFiniteLoss

OPTUNA = next(preset for preset in plugins.PRESETS if preset.choice == "hparams_search=optuna")
needs_optuna = pytest.mark.skipif(not plugins.installed(OPTUNA.plugin),
                                  reason=f"needs the optional Optuna sweeper: {OPTUNA.install}")
TINY = ["trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu"]
SEARCHED = ("optim.lr", "optim.weight_decay", "loader.batch_size", "trainer.label_smoothing", "augment")


def hparams_session(run_dir):
    """The run's HPARAMS session as TensorBoard reads it: its hparams and its end status."""
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in events(run_dir).PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    values = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.items()}
    return values, content["_hparams_/session_end_info"].session_end_info.status


@pytest.mark.slow
@needs_optuna
def test_a_trial_that_goes_nan_is_failed_and_the_search_goes_on(crop_csv, tmp_path):
    """Two trials, the first with a learning rate that makes the loss NaN: the search goes on and ends normally, the study's best
    value is the finished trial's val/acc_best (what train.py returns), the summary lists the NaN one as failed,
    and TensorBoard's HPARAMS holds both sessions, the failed one with status Failure."""
    sweep = tmp_path / "search"
    # Seed 0 of optuna 2.10's random sampler draws 1e9 first, then 0.05: a failed trial, then one that finishes.
    # (Not the grid sampler: hydra-optuna-sweeper 1.3.0 crashes when a grid's last trial fails.)
    result = run_python(TRAIN_PY, "-m", "hparams_search=optuna", "hydra/sweeper/sampler=random",
                        "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
                        "optim.lr=choice(0.05,1e9)", "optim.weight_decay=0", "loader.batch_size=16",
                        "trainer.label_smoothing=0", "augment=hflip", f"dataset.csv={crop_csv}", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((sweep / "summary.json").read_text())
    jobs = {next(o for o in job["overrides"] if o.startswith("optim.lr=")): job for job in summary["jobs"]}
    assert list(jobs) == ["optim.lr=1000000000.0", "optim.lr=0.05"]
    failed, finished = jobs["optim.lr=1000000000.0"], jobs["optim.lr=0.05"]
    assert failed["status"] == "failed" and failed["error"].startswith("NonFiniteLoss: the ")
    assert finished["status"] == "finished"
    assert summary["counts"] == {"finished": 1, "failed": 1, "no result": 0}
    assert "| failed: NonFiniteLoss: the " in (sweep / "summary.md").read_text()

    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert study["best_value"] == finished["metrics"]["val/acc_best"]
    assert study["best_params"] == {"optim.lr": 0.05}

    for job, status in ((finished, api_pb2.STATUS_SUCCESS), (failed, api_pb2.STATUS_FAILURE)):
        values, ended = hparams_session(sweep / job["folder"])
        assert ended == status
        lr = float(next(o for o in job["overrides"] if o.startswith("optim.lr=")).partition("=")[2])
        assert values["optim.lr"] == pytest.approx(lr) and values["augment.hflip"] == 1  # booleans are stored as numbers


@pytest.mark.slow
@needs_optuna
def test_the_preset_searches_its_five_keys(crop_csv, tmp_path):
    """TPE's first trials draw every searched key inside the preset's ranges; the summary has one job per trial."""
    sweep = tmp_path / "search"
    result = run_python(TRAIN_PY, "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
                        f"dataset.csv={crop_csv}", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"]["finished"] == 2
    for job in summary["jobs"]:
        drawn = {o.partition("=")[0]: o.partition("=")[2] for o in job["overrides"]}
        assert set(SEARCHED) <= set(drawn)
        assert 0.001 <= float(drawn["optim.lr"]) <= 0.2 and 1e-6 <= float(drawn["optim.weight_decay"]) <= 1e-2
        assert drawn["loader.batch_size"] in {"32", "64", "128", "256"}
        assert 0 <= float(drawn["trainer.label_smoothing"]) <= 0.2
        assert drawn["augment"] in {"none", "hflip", "standard", "dihedral"}
        values, ended = hparams_session(sweep / job["folder"])
        assert ended == api_pb2.STATUS_SUCCESS and values["loader.batch_size"] == int(drawn["loader.batch_size"])


@pytest.mark.slow
def test_the_search_is_one_line_without_its_plugin_or_without_m(crop_csv, tmp_path):
    """Without the sweeper: one line naming what to install; with it but without -m: one line asking for -m."""
    result = run_python(TRAIN_PY, "hparams_search=optuna", f"dataset.csv={crop_csv}", *TINY, cwd=tmp_path)
    assert result.returncode == 1
    expected = (f"Error: hparams_search=optuna needs Hydra's Optuna sweeper: {OPTUNA.install}"
                if not plugins.installed(OPTUNA.plugin) else
                "Error: hparams_search=optuna searches only in multirun mode: add -m (python train.py -m "
                "hparams_search=optuna ...); without it one run would train with the defaults")
    assert result.stderr.splitlines() == [expected]
    assert not (tmp_path / "outputs").exists()


def test_a_failed_run_ends_its_hparams_session_as_failed(make_cfg, crop_csv, tmp_path):
    """A NaN loss stops the run with one line, and HPARAMS lists the run with status Failure, not as a success."""
    with pytest.raises(NonFiniteLoss):
        training.run(make_cfg(f"dataset.csv={crop_csv}", "optim.lr=1e9", run_dir=tmp_path / "nan"))
    values, ended = hparams_session(tmp_path / "nan")
    assert ended == api_pb2.STATUS_FAILURE and values["optim.lr"] == 1e9
