"""``atso-fast bench`` (:mod:`atso_fast.bench.cli`, :mod:`atso_fast.bench.runner`) and the helpers
the scripts in ``benchmarks/`` share with it: the built-in network (:mod:`atso_fast.bench.networks`)
and peak-memory sampling (:mod:`atso_fast.bench.memory`). The CT-like volume is
:func:`atso_fast.datasets.synthetic.synthetic_ct`; the MONAI baseline lives in ``benchmarks/``
(it is not shipped in the package)."""
