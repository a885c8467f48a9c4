"""The HTTP front-end: OpenAI- and Triton-compatible routes over the engine client.
Runs in its own process (`python -m dist_infer.serve.api_server`), started by rank 0."""
