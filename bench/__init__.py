"""The benchmark: gateway vs a bare aiohttp server and vs the simulator, each in its own process.

Run it with `python -m bench` from the repository root (`--help` for the knobs, `--smoke` for a tiny load).
"""
