"""Training: the shared loop (one process or data-parallel under torchrun) and checkpoints."""
