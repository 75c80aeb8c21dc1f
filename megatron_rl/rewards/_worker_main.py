"""Entry point of a grader worker process: ``python -m megatron_rl.rewards._worker_main``.

Kept apart from ``worker`` because the package imports ``worker``; running an already
imported module with ``-m`` would execute it twice.
"""

from megatron_rl.rewards.worker import main

if __name__ == "__main__":
    main()
