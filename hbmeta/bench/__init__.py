"""Benchmarks (``hbmeta bench ...``): each prints a table and writes JSON.

- :mod:`hbmeta.bench.step`: time and memory of one meta-iteration versus inner steps;
- :mod:`hbmeta.bench.accuracy`: every algorithm on the same tasks, seeds and budget, with 95% intervals;
- :mod:`hbmeta.bench.throughput`, :mod:`hbmeta.bench.scaling`: tasks per second, scaling with network size;
- :mod:`hbmeta.bench.gradient_study`: meta-gradient error against the exact linear-regression posterior;
- :mod:`hbmeta.bench.demo`: the README's main job, GEM-BML+ against MAML on sinusoid.
"""
