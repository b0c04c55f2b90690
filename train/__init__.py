"""The training job: model, data, trainer, checkpoints, metrics, bench, configs."""
