"""``atso-fast bench``'s measurement (:mod:`atso_fast.bench.runner`; its command line is
:mod:`atso_fast.cli.bench`) and the helpers the scripts in ``benchmarks/`` share with it: the
built-in network (:mod:`atso_fast.bench.networks`) and peak-memory sampling
(:mod:`atso_fast.bench.memory`). The CT-like volume is
:func:`atso_fast.datasets.synthetic.synthetic_ct`; the volume benchmark's MONAI baseline lives in
``benchmarks/`` (it is not shipped in the package). ``atso-fast bench --scenes``
(:mod:`atso_fast.bench.scenes`) times 2D RGB frames beside a plain torch loop and MONAI's
``sliding_window_inference``, in one run."""
