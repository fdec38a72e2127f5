"""The benchmarks of conceptlab: one tool, ``python -m benchmarks`` (see ``frame.py``).

Results live in ``benchmarks/results/NAME/`` with their provenance; ``docs/results.md`` is
generated from them by ``python -m benchmarks tables`` (``make results``).
"""
