"""The wire: protocol v1's messages, the codec that builds every frame, and
the error and close codes. Imports nothing else of wsserver."""
