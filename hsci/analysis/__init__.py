"""Conclusions across runs, read from their records (summary.json, the saved config, the test predictions), never
from a checkpoint, so that they are quick over thousands of runs.

- found: finding run directories (a run, a sweep, a folder of them, a glob) and reading what they recorded
- stats: what a group of replicate runs says (mean, interval), and what one group says against another
- runs: `hsci runs`, the runs under outputs/ as a table
- compare: `hsci compare`, runs grouped by their comparable config, with statistics, a table, a plot
- plots: a run's plots (learning curves, confusion matrix), a sweep's, and `hsci plot`

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the record, and each other; SciPy and matplotlib
where they are used. Never the parts, the loop, the jobs or the door, nor torch.
"""
