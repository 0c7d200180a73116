"""The transfer benchmark: pretrain -> zero-shot -> budget curve per target city, and how it is scored.

    stages.py       the stage loop on budget-restricted views of each target city
    strategies.py   the strategy interface and full / freeze-transferred / scratch
    state.py        partial state transfer between models built for different graphs
    budget.py       budget sampler and loss-gradient scheduler
    score.py        the comparable score and GraphTune-lite's within-run S_uep
    experiment.py   params -> checked plan -> tracked stages -> results files

Importing this package imports none of its modules (score.py is read by `compare` without torch).
"""
