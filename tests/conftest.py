import os

# Tests run on the CPU; keep XLA from grabbing every core per pytest-xdist worker.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
