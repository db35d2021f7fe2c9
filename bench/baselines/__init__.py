"""Baseline servers, each as small as possible and doing the same work as wsserver.

* ``raw_ws``   -- bare ``websockets`` server: pre-encoded frames of the same size,
  no protocol (the ceiling); also ``broadcast()`` and a per-connection
  ``await send()`` loop for fan-out, and a replay loop.
* ``sse``      -- FastAPI + sse-starlette + uvicorn: the same tokens as SSE events.
* ``naive_ws`` -- FastAPI/Starlette WebSocket on uvicorn, one ``await send_json``
  per token per client (and a per-connection ``send_text`` loop for fan-out).

Every baseline speaks the same tiny request language (``{"op": ...}``, see
``_shared``) and sends frames shaped like wsserver's: ``stream.delta`` with
``seq``/``stream``/``index``/``text``, ``stream.end``, channel ``message``.
Each prints ``listening on ws://127.0.0.1:PORT/`` when ready.
"""
