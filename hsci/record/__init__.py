"""The record: a run directory and what is written into it.

- rundir: summary.json, metrics.jsonl, checkpoints and the saved config, each written safely
- owner: which process owns a run directory, and which directory a run or a sweep gets (Hydra's `Guard` callback)
- signing, trust: which run directories build as they are, and `hsci trust`
- resume: what last.pt records and how a run is put back where it stopped
- kept: the checkpoints kept at the end of each epoch (best, last, the K best, one every N epochs)
- comparable: what makes two runs comparable (the experiment's config, fingerprints of its held-out splits)
- predictions: a run's per-example test predictions, and the intervals of its test metrics
- weights: the weights a new run starts from (model.weights=<file>, init_from=<run dir>)
- rerun: a new run from a run's saved config (`hsci train from=<run dir>`)

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the parts, and each other; never the loop, the jobs or
the door.
"""
