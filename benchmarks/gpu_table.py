"""The table benchmarks/gpu.sh prints last: each GPU figure of issue 4, the GPU tests of issue 8 and the DDP
overhead of issue 9, against its target, read from the outputs gpu.sh keeps of its parts (a NAME.txt and NAME.rc
each).

    python3 benchmarks/gpu_table.py PARTS_DIR [DEVICE]

Standard library only, so the table comes out whatever else is broken.
"""

import json
import re
import sys
from pathlib import Path

PEAK = 797e12  # FLOP/s: the H200's measured bf16 matrix-product peak (../shared/gpu-anchors.md)
GFLOP = {"resnet18": 3.33, "resnet50": 24.5}  # training (about 3 x forward) per image: CIFAR stem at 32 px; 224 px
ANCHOR_BARE = {"resnet18": 51_600, "resnet50": 4_660}  # img/s of the bare loop, low end (../shared/gpu-anchors.md)


class Missing(Exception):
    """A part that did not give its figure: the reason is the message."""


def part(out: Path, name: str) -> str:
    """A part's output; Missing when it was not run, failed or was cut short."""
    rc_file, text_file = out / f"{name}.rc", out / f"{name}.txt"
    rc = rc_file.read_text().strip() if rc_file.exists() else "skipped"
    text = text_file.read_text(errors="replace") if text_file.exists() else ""
    if rc == "0":
        return text
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
    if rc == "skipped":
        raise Missing("not run: no time left")
    if rc in ("124", "137"):
        raise Missing(f"cut short by its time limit (see {name}.txt)")
    raise Missing(f"failed, exit {rc}: {last[:100]} (see {name}.txt)")


def keyed(text: str) -> dict[str, str]:
    """The `key  value` lines benchmarks/step_vs_bare.py prints."""
    return dict(m.groups() for m in re.finditer(r"^(\S.*?) {2,}(\S+)$", text, re.M))


def number(text: str) -> float:
    return float(text.replace(",", ""))


def steps(out: Path, name: str) -> tuple[float, float, float]:
    """(hsci img/s, bare img/s, hsci / bare) of a step_vs_bare.py run."""
    values = keyed(part(out, name))
    try:
        return number(values["hsci_img_per_s"]), number(values["bare_img_per_s"]), number(values["hsci/bare"])
    except KeyError as e:
        raise Missing(f"no {e} in {name}.txt") from e


def ddp(out: Path) -> dict:
    """DDP / plain (median over rounds) on each clock, its span on the wall clock, the two sides' img/s (wall) and
    the backend, of a ddp_vs_plain.py run."""
    values = keyed(part(out, "ddp"))
    keys = {"wall": "ddp/plain (wall) median", "cpu": "ddp/plain (cpu) median", "plain": "plain img/s (wall)",
            "ddp": "ddp img/s (wall)"}
    try:
        return {name: number(values[key]) for name, key in keys.items()} | {
            "span": values["ddp/plain (wall) min..max"], "backend": values["backend"]}
    except KeyError as e:
        raise Missing(f"no {e} in ddp.txt") from e


def loaders(out: Path) -> tuple[float, float, float]:
    """(gpu path img/s, torch path img/s, gpu / torch) of step_vs_bare.py --loaders."""
    values = keyed(part(out, "loaders"))
    rate = {k.split()[0]: number(v) for k, v in values.items() if k.endswith(" img/s")}
    if not {"gpu", "torch"} <= rate.keys() or "gpu/torch" not in values:
        raise Missing("no '<path> img/s' or gpu/torch lines in loaders.txt")
    return rate["gpu"], rate["torch"], number(values["gpu/torch"])


def epoch_rate(out: Path, name: str) -> float:
    """Training img/s of the last epoch of an `hsci train` run."""
    part(out, name)
    try:
        return json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])["train_img_per_s"]
    except (OSError, IndexError, KeyError, ValueError) as e:
        raise Missing(f"no epoch record in {name}/metrics.jsonl ({e})") from e


def tests(out: Path, name: str) -> tuple[str, bool]:
    """(what pytest -v reported, whether every test passed), counted from its per-test lines."""
    path, rc_file = out / f"{name}.txt", out / f"{name}.rc"
    rc = rc_file.read_text().strip() if rc_file.exists() else "skipped"
    if rc == "skipped":
        raise Missing("not run: no time left")
    text, outcome = path.read_text(errors="replace"), "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
    results = dict(re.findall(rf"::(\S+) ({outcome})\b", text))  # -v: tests/x.py::name PASSED [ 12%]
    results |= {test: result for result, test in re.findall(rf"({outcome}) \S+::(\S+)", text)}  # -n, summary
    if not results:
        part(out, name)  # says why, if pytest failed
        raise Missing(f"no test reported (see {name}.txt)")
    counts = {}
    for result in results.values():
        counts[result.lower()] = counts.get(result.lower(), 0) + 1
    said = ", ".join(f"{n} {result}" for result, n in counts.items())
    bad = [test for test, result in results.items() if result in ("FAILED", "ERROR")]
    if bad:
        said += ": " + ", ".join(bad)
    if rc in ("124", "137"):
        said += " (cut short by its time limit)"
    return said, rc == "0" and counts.get("passed", 0) == len(results) > 0


def mfu(rate: float, model: str) -> str:
    return f"{100 * rate * GFLOP[model] * 1e9 / PEAK:.1f} %"


def met(ok: bool) -> str:
    return "met" if ok else "not met"


# Each figure: (what was measured, verdict); Missing when its part gave nothing.

def step_ratio(out: Path, name: str) -> tuple[str, str]:
    hsci, bare, ratio = steps(out, name)
    return f"{ratio:.3f} ({hsci:,.0f} / {bare:,.0f} img/s)", met(ratio >= 0.95)


def step_rate(out: Path, name: str, model: str) -> tuple[str, str]:
    hsci = steps(out, name)[0]
    return f"{hsci:,.0f} (MFU {mfu(hsci, model)})", met(hsci >= 0.95 * ANCHOR_BARE[model])


def epoch_vs_bare(out: Path) -> tuple[str, str]:
    epoch, bare = epoch_rate(out, "train_gpu"), steps(out, "r18")[1]
    return (f"{epoch:,.0f} img/s, {epoch / bare:.3f} x bare; {50_000 / epoch:.2f} s per 50k images; "
            f"MFU {mfu(epoch, 'resnet18')}", met(epoch >= 0.95 * bare))


def epoch_loaders(out: Path) -> tuple[str, str]:
    gpu, torch = epoch_rate(out, "train_gpu"), epoch_rate(out, "train_torch")
    return f"{gpu / torch:.2f} ({gpu:,.0f} / {torch:,.0f} img/s)", met(gpu / torch >= 1.5)


def ddp_ratio(out: Path) -> tuple[str, str]:
    d = ddp(out)
    return (f"{d['wall']:.3f} ({d['span']} over rounds; {d['ddp']:,.0f} / {d['plain']:,.0f} img/s; CPU time "
            f"{d['cpu']:.3f}; {d['backend']})", met(d["wall"] >= 0.97))


def loader_ratio(out: Path) -> tuple[str, str]:
    gpu, torch, ratio = loaders(out)
    return f"{ratio:.1f} ({gpu:,.0f} / {torch:,.0f} img/s)", "-"


def test_run(out: Path, name: str) -> tuple[str, str]:
    said, passed = tests(out, name)
    return said, met(passed)


def rows(out: Path) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) for every figure; one whose part gave nothing says why."""
    r18, r50 = "ResNet-18 (CIFAR stem), 32 px, batch 512, bf16, channels_last", "ResNet-50, 224 px, batch 256, bf16"
    figures = [
        ("GPU tests (tests/test_gpu.py)", "all pass", lambda: test_run(out, "tests")),
        (f"{r18}: hsci step / bare step", ">= 0.95", lambda: step_ratio(out, "r18")),
        (f"{r18}: hsci step img/s (MFU)", f">= {0.95 * ANCHOR_BARE['resnet18']:,.0f} (0.95 x anchor bare)",
         lambda: step_rate(out, "r18", "resnet18")),
        ("hsci train epoch of that, CIFAR-shaped files, gpu loader, crop+flip", ">= 0.95 x bare step",
         lambda: epoch_vs_bare(out)),
        ("hsci train epoch: gpu loader / torch loader (8 workers)", ">= 1.5", lambda: epoch_loaders(out)),
        ("loaders alone, augmented model input: gpu / torch (8 workers)", "report (anchors 5,600,000 / 32,900)",
         lambda: loader_ratio(out)),
        (f"{r50}: hsci step / bare step", ">= 0.95", lambda: step_ratio(out, "r50")),
        (f"{r50}: hsci step img/s (MFU)", f">= {0.95 * ANCHOR_BARE['resnet50']:,.0f} (0.95 x anchor bare)",
         lambda: step_rate(out, "r50", "resnet50")),
        (f"{r18}: hsci train epoch, DDP path of 1 process / plain path", ">= 0.97 (wall clock)",
         lambda: ddp_ratio(out)),
        ("hsci bench, resnet18, batch 512", "report", lambda: (bench(out), "-")),
    ]
    if (out / "loader_tests.rc").exists():
        figures.append(("CPU-device loader tests (tests/test_loaders.py)", "all pass",
                        lambda: test_run(out, "loader_tests")))
    table = []
    for figure, target, measure in figures:
        try:
            measured, verdict = measure()
        except Missing as e:
            measured, verdict = str(e), "no figure"
        table.append((figure, measured, target, verdict))
    return table


def bench(out: Path) -> str:
    """hsci bench's step and loader figures, and which bounds training."""
    text = part(out, "bench")
    rates = re.findall(r"img_per_s\s+([\d,.]+)", text)
    peak = re.search(r"peak_mem_gb\s+([\d.]+)", text)
    bound = re.search(r"bound by (the \w+ ?\w*)", text)
    said = f"step {number(rates[0]):,.0f} img/s" if rates else "no step figure"
    said += f", peak {float(peak[1]):.2f} GB" if peak else ""
    said += f"; loader {number(rates[1]):,.0f} img/s" if len(rates) > 1 else ""
    return said + (f"; bound by {bound[1]}" if bound else "")


def main() -> None:
    parts = Path(sys.argv[1])
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    try:
        machine = part(parts, "versions").strip()
    except Missing as e:
        machine = f"python and its packages: {e}"
    print(f"\nGPU figures ({machine})")
    if device != "cuda":
        print(f"DRY RUN on {device} with small sizes: the figures say nothing about a GPU")
    table = [("figure", "measured", "target", "verdict"), *rows(parts)]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for i, r in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("MFU: img/s x training GFLOP per image (3.33 ResNet-18 CIFAR stem at 32 px, 24.5 ResNet-50 at 224 px) / "
          "797 TFLOP/s, the H200's measured bf16 peak; published CIFAR-10 records reach 25-45 %.")


if __name__ == "__main__":
    main()
