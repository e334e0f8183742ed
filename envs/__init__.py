"""Environment presets (YAML data, shipped as package data)."""
