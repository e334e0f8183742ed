"""Shipped presets: envs/ and agents/ at the repository root are mapped here (see pyproject.toml)."""
