"""Bridges to other libraries. Each submodule imports its library; nothing here imports one eagerly."""
