"""The ``serve`` operator: Triton model repositories built from typed specs.

``repository`` renders the CPU runtime's repository (a decoupled python model, ``triton_model``, over
OpenVINO GenAI continuous batching); ``export`` turns an HF checkpoint into the OpenVINO IR it needs;
``operator`` is the stage's ``run(ctx)``.
"""
