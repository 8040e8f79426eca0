"""Tools outside hsci that watch a run: the loggers a config chooses (`logger=tensorboard`, `logger=mlflow`, both)
and the one object the loop hands its values to (loggers), TensorBoard's event files (tensorboard) and MLflow's
tracking (mlflow). Each tool is imported when a run chose it, never by a plain run.

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the parts, the record and each other; never the
analysis, the loop, the jobs or the door.
"""
