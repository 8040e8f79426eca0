"""`hsci bench [key=value ...]`: how fast will this config train on this machine?

It times the composed config's own training step (hsci/loop/step.py's `train_epoch`, with its model, loss,
optimizer, precision, memory format and compile setting) on synthetic batches of the dataset's shape, so
it needs no download; then, when the data is present, the loader's own throughput, and says which of the
two bounds training."""

import dataclasses
import time

import torch
from hydra.utils import instantiate

from hsci import UserError, report, user_error
from hsci.loop.step import Epoch, Readings, peak_memory_gb, reset_peak_memory, train_epoch, warm_up
from hsci.parts.build import build, compose, optimizing
from hsci.parts.datasets import Data, Loading, Scaling, Tensors
from hsci.parts.loaders import pick_loader, train_loader


def run_bench(args: list[str]) -> int:
    """`hsci bench [key=value ...] [steps=30 warmup=5]`."""
    given = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in ("steps", "warmup"))
    opts = {"steps": "30", "warmup": "5"} | given
    for key, least in (("steps", 1), ("warmup", 0)):
        if not opts[key].isdigit() or int(opts[key]) < least:
            raise UserError(f"{key}={opts[key]} is invalid: it must be a whole number, at least {least}")
    steps, warmup = int(opts["steps"]), int(opts["warmup"])
    cfg = compose([a for a in args if a.split("=", 1)[0] not in opts])
    try:
        data, absent = instantiate(cfg.data), None
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        data, absent = None, str(cause)
    p = build(cfg, data=synthetic(cfg, data, 2 * cfg.data.batch_size))
    optim = optimizing(cfg, p, epochs=1, steps_per_epoch=warmup + steps)
    x, y = (t[:cfg.data.batch_size].to(p.device) for t in (p.data.train.x, p.data.train.y))
    compile_s = warm_up(p, cfg.data.batch_size) if cfg.trainer.compile else 0.0

    def run(n: int) -> float:
        start = time.perf_counter()
        epoch = Epoch.start(1, n, p.device)
        readings = Readings(n, epoch)  # read once, at the end
        train_epoch(p, optim=optim, batches=[(x, y)] * n, epoch=epoch, readings=readings)
        return time.perf_counter() - start

    run(warmup)
    reset_peak_memory(p.device)
    seconds = run(steps)
    step_rate = steps * len(x) / seconds
    results = {"img_per_s": step_rate, "ms_per_step": 1000 * seconds / steps, "peak_mem_gb": peak_memory_gb(p.device)}
    if compile_s:
        results["compile_s"] = compile_s
    where = (f"{p.device}, {p.speed.precision}, channels_last {p.speed.channels_last}, batch {len(x)}, "
             f"input {tuple(x.shape[1:])}")
    report.metrics_table(f"training step ({where}), synthetic batches", results)
    if data is None:
        report.say(f"loader not measured: {absent}")
        return 0
    kind = pick_loader(data.loading.loader, data, p.device)
    loader = train_loader(data.train, data.loading, p.device, cfg.seed, kind)
    load_rate = loader_rate(loader, p.to_input, p.device, steps)
    report.metrics_table(f"loader ({kind}, to model input on {p.device})", {"img_per_s": load_rate})
    bound = "the loader" if load_rate < step_rate else "the training step"
    report.say(f"bound by {bound}: loader {load_rate:,.0f} img/s, step {step_rate:,.0f} img/s"
               + ("; try data.loader=gpu or more data.num_workers" if bound == "the loader" else ""))
    return 0


def synthetic(cfg, data: Data | None, n: int) -> Data:
    """`n` random samples shaped as the dataset's (as its config declares them when the files are absent)."""
    if data is None:
        d = cfg.data
        if "image_shape" in d:
            shape, classes = tuple(d.image_shape), d.num_classes
        elif "image_size" in d:  # an image folder: its classes are unknown without it
            shape, classes = (d.channels, d.image_size, d.image_size), 10
        else:
            raise UserError(f"data: {d._target_} declares no image_shape/num_classes for a run without its files")
        loading = Loading(d.batch_size, d.num_workers, d.loader, d.get("drop_last", "auto"))
        data = Data(None, None, None, "multiclass", shape, classes, loading,
                    Scaling(tuple(d.mean), tuple(d.std)))
    if data.scaling.mean is None:  # tables: standardised features
        x = torch.randn(n, *data.input_shape)
    else:
        x = torch.randint(0, 256, (n, *data.input_shape), dtype=torch.uint8)
    y = torch.randint(0, data.num_outputs, (n,)) if data.task == "multiclass" else torch.rand(n, 1)
    split = Tensors(x, y)
    return dataclasses.replace(data, train=split, val=split, test=split)


def loader_rate(loader, to_input, device: torch.device, batches: int) -> float:
    """Images per second the loader delivers as model input on `device`, over `batches` batches after one of
    warm-up; a set of fewer batches is gone through again, as epochs would."""
    def stream():
        while True:
            yield from loader

    it = stream()
    next(it)
    start, n = time.perf_counter(), 0
    for _, (x, _) in zip(range(batches), it):
        out = to_input(x.to(device, non_blocking=True))
        n += len(x)
    out.sum().item()  # waits for the device
    return n / (time.perf_counter() - start)
