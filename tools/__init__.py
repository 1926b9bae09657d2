"""Tools a user runs beside the loop: benchmarks (bench.py, bench_gpu.py, the sampler candidates in samplers.py),
plots (plot.py), the HTML report (report.py) and the reproduction script (repro.sh). They import the project; the
project never imports them."""
