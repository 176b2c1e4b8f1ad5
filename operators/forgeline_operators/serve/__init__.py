"""The ``serve`` operator: a Triton model repository for the stage's model, through its engine.

``operator`` is the stage's ``run(ctx)``: it asks the engine registry (:mod:`forgeline_operators.engines`)
which engine serves the model, has the engine prepare its artifact and write the repository. What is
particular to an engine (OpenVINO, TensorRT-LLM) lives in that engine's folder, not here.
"""
