"""`deltatalk serve`: the engine behind an OpenAI-compatible HTTP API.

- protocol.py  request fields -> ChatRequest (validated), OpenAI-shaped bodies and errors
- pool.py      kept ChatSessions, matched to a request by its token prefix, LRU within a budget
- worker.py    one request's generation on the kernel thread (stop strings, usage figures)
- http.py      the Starlette app: routes, auth, the bounded queue, SSE, disconnects
- cli.py       the `serve` subcommand's arguments and start-up
"""
