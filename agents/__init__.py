"""Agent presets (YAML data, shipped as package data)."""
