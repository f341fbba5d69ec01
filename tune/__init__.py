"""Ray Tune over the training step of `train`."""
