"""Training: the shared loop and checkpoints."""
