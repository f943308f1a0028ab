"""distill serve: an OpenAI-compatible gateway that applies publish/routing.yaml to live traffic.

    python -m distill serve run_dir=DIR [serve.port=8088] [serve.student_endpoint=URL]

Modules: ``command`` (the command: config, child servers, uvicorn), ``app`` (the ASGI routes, errors, auth, limits),
``gateway`` (one task request: student -> confidence -> routing.decide -> teacher through the ledger),
``student`` (student clients and the circuit breaker), ``runtime`` (the published GGUF in llama.cpp, a child
process), ``scored`` (evaluate's scored confidence for one request), ``metrics`` (Prometheus).
"""
