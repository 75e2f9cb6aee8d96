"""The peers flowkeeper is measured against, one module each, run in their own processes.

Each module is runnable as ``python -m bench.peers.<name> --database-url URL
--workflows N`` and prints one JSON line with its figures; the benchmark-only
dependencies they import come from ``bench/requirements.txt``.
"""
