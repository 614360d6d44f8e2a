"""Training a model: settings, per-epoch passes, the one epoch loop, checkpoints, losses,
tuples, adversarial and certified training."""
