"""Benchmarks: fetchd against fetchmail and a download-only ceiling, on a private Dovecot.

Run ``bench/run --help`` (or ``python -m bench --help`` from the project's virtual environment);
docs/benchmarks.md has the results and how to read them.
"""
