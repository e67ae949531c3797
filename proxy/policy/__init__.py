"""Routing policies: the policy model, its YAML loader, the pure engine and capability safety."""
