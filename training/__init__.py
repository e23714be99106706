"""The training job: DeepSpeed engine, loop, checkpoints, config, context parallelism (see DESIGN §4, §5, §9)."""
