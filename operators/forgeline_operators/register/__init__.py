"""The ``register`` operator: an MLflow model version for a published directory, by reference."""
