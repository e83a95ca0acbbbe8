"""``gradkit bench``: a fair optimizer benchmark (AlgoPerf / DeepOBS style).

Modules, each with a small interface:

* :mod:`~gradkit.bench.workloads` — built-in problems and the workload protocol.
* :mod:`~gradkit.bench.optimizers` — the declared default optimizer set and search spaces.
* :mod:`~gradkit.bench.search` — seeded quasi-random sampling of search spaces.
* :mod:`~gradkit.bench.suites` — ``quick``, ``full`` and ``tiny`` suites.
* :mod:`~gradkit.bench.protocol` — tuning / selection / seed-rerun protocol.
* :mod:`~gradkit.bench.runner` — one trial (training loop, time to target, NaN guard).
* :mod:`~gradkit.bench.executors` — serial, process-pool and Ray execution.
* :mod:`~gradkit.bench.orchestrate` — scheduling, resuming, progress.
* :mod:`~gradkit.bench.store` — the SQLite results store.
* :mod:`~gradkit.bench.scoring` — performance profiles, integrated score, speedups.
* :mod:`~gradkit.bench.analysis`, :mod:`~gradkit.bench.report`, :mod:`~gradkit.bench.plots`
  — tables, HTML/CSV report and figures.

Submodules are imported on use so ``gradkit --help`` stays fast.
"""
