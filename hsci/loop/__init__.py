"""The loop: the training step (step), the epochs of a run (train), where they pause to validate or stop (pace),
evaluation and `hsci eval` (evaluate), a run's model on new inputs, `hsci predict` (predict), and `hsci bench`
(bench); what watches the steps when asked (debug: anomaly mode, fast_dev_run; profile: torch.profiler), and the
model's layer table (layers).

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the parts, the record and each other; never the jobs or
the door.
"""
