"""Core building blocks: configs, the component registry and the trainer state."""
