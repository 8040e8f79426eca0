"""How a training job runs: one job of `hsci train` and its recorded outcome (job), one run on many processes
(ranks, launch), and many jobs: a sweep through Hydra's launchers (sweep), a search that Optuna drives and prunes
(tune).

Imports: everything below the door (the base, the parts, the record, the loop) and each other; never the door.
"""
