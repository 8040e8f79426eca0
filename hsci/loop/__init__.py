"""The loop: the training step (step), the epochs of a run (train), where they pause to validate or stop (pace),
evaluation and `hsci eval` (evaluate), a run's model on new inputs, `hsci predict` (predict), and `hsci bench`
(bench).

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the parts, the record and each other; never the jobs or
the door.
"""
