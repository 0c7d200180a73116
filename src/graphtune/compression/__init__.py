"""Data-free compression with compensation: iterative LBYL as in PA-DFCR (see prune.py, lbyl.py, schedule.py)."""
