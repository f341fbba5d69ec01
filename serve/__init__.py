"""Ray Serve + vLLM multi-LoRA serving of the adapters `train` publishes."""
