"""Launching jobs at cluster scale: placement, then torchrun, Slurm or nemo-run commands.

``placement`` computes where the trainer ranks and rollout servers run; ``torchrun``,
``slurm`` and ``nemo`` render (and run or submit) the commands; ``array`` keeps the task list
of array jobs and gathers their results. nemo-run is imported only inside ``nemo``.
"""
