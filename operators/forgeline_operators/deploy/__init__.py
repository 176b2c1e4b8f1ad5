"""The ``deploy`` operator (local target) and the serving machinery it runs.

``install`` fetches and caches tritonserver 2.51 (and the numpy-1 stub environment its python backend
needs); ``triton`` manages one server process; ``front`` is the OpenAI-compatible FastAPI app;
``endpoint`` supervises server + front as a detached, recorded endpoint; ``loadgen`` is the client
behind ``forgeline bench endpoint``; ``operator`` is the stage's ``run(ctx)``.
"""
