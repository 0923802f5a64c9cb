"""The runner: `training.run(cfg)` trains, evaluates, logs and returns the final metrics.

`run` is imported on first use, not with the package: the entry points import light modules of it (schema,
run_folder, distributed) to compose and check a config, and `python train.py --help`, `--cfg job` or a
refused run dir then start in ~1 s instead of ~4 s of torchvision, TensorBoard and the rest of the runner."""


def __getattr__(name: str):
    if name == "run":
        from training.runner import run

        return run
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = ["run"]
