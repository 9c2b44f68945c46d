"""Small utilities: atomic files, distributed helpers, device detection."""
