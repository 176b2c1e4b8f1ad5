"""Promotion of registered model versions: gates, aliases, the production endpoint, history."""
