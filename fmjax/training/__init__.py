"""Training: the state and optimizer (`state`), one pure step for any objective
(`step`), the loop with its log and bit-exact resume (`loop`), orbax checkpoints
(`checkpoints`)."""
