"""The sans-I/O protocol core: sessions, streams, sequencing, replay, channels.

Nothing here does I/O or imports asyncio, websockets, redis, the server's
auth or config: decoded messages and provider events go in, actions and
encoded frames come out, and the transport pulls them (PROTOCOL.md is the
spec; ARCHITECTURE.md draws the parts).
"""
