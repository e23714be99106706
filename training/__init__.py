"""Everything around the model: configs, CLI, benchmarks (and later the trainer, DeepSpeed, context parallel)."""
