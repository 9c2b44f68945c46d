"""Models: :class:`~ml.models.base.BaseModel` is an ``nn.Module`` built from a config."""
