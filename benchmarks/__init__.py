"""``rlhf_bench``: the project's benchmarks (kernels, memory, rollouts, end to end, distributed),
never part of the test suite. ``rlhf bench ...`` reaches them through the built-in ``bench`` plugin
(:mod:`rlhf_bench.commands`, hook ``rlhf_register_commands``); the ``bench_*.py`` scripts in this
directory run them from a checkout."""
