"""Benchmark harness for wsserver: ``python -m bench`` (see README "Benchmarks").

Layout:

* ``cli``        -- the command line, the run loop and the summary;
* ``scenarios``  -- the five scenarios (streaming, paced, fanout, idle, control);
* ``procs``      -- servers under test and load-generator processes, CPU/RSS via psutil;
* ``loadgen``    -- the load generator (one process per share of the connections);
* ``wsclient``   -- a minimal asyncio WebSocket client (upgrade by hand, frame walker);
* ``report``     -- tables, targets, JSON and PNG charts;
* ``baselines/`` -- raw websockets, FastAPI + sse-starlette, naive FastAPI WebSocket.

Nothing here is imported by ``wsserver``; the harness drives the server as a
separate process (``python -m wsserver serve``) over 127.0.0.1 only.
"""
