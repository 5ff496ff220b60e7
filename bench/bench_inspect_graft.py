"""Benchmark: `caffetune inspect` and `caffetune graft` on a VGG16-sized (~550 MB) caffemodel vs loading the same
net and weights with pycaffe, each in its own process; prints time ratios and peak memory against the file size.

The caffemodel is VGG16 with random weights, generated once with pycaffe into $CAFFETUNE_BENCH_DIR
(default /tmp/caffetune-bench). Targets (issue 7): both at least 3x faster than pycaffe, peak memory <= ~2x the file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from caffetune.model import caffe_tools

BENCH_DIR = Path(os.environ.get("CAFFETUNE_BENCH_DIR", "/tmp/caffetune-bench"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def conv(name: str, bottom: str, outputs: int) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {outputs} pad: 1 kernel_size: 3 '
            f'weight_filler {{ type: "gaussian" std: 0.01 }} }} }}\n'
            f'layer {{ name: "relu{name[4:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def vgg16(classes: int = 1000, head: str = "fc8") -> str:
    """VGG16's deploy net (Simonyan & Zisserman, configuration D) with an Input layer."""
    text = ['name: "VGG_ILSVRC_16_layers"\n'
            'layer { name: "data" type: "Input" top: "data"\n'
            '  input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }\n']
    bottom = "data"
    for block, (outputs, count) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for index in range(1, count + 1):
            name = f"conv{block}_{index}"
            text.append(conv(name, bottom, outputs))
            bottom = name
        text.append(f'layer {{ name: "pool{block}" type: "Pooling" bottom: "{bottom}" top: "pool{block}"\n'
                    f'  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')
        bottom = f"pool{block}"
    for name, outputs in (("fc6", 4096), ("fc7", 4096), (head, classes)):
        text.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}"\n'
                    f'  inner_product_param {{ num_output: {outputs} weight_filler {{ type: "gaussian" std: 0.005 }} '
                    f'bias_filler {{ type: "constant" value: 0.1 }} }} }}\n')
        if name != head:
            text.append(f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
                        f'layer {{ name: "drop{name[2:]}" type: "Dropout" bottom: "{name}" top: "{name}" }}\n')
        bottom = name
    text.append(f'layer {{ name: "prob" type: "Softmax" bottom: "{head}" top: "prob" }}\n')
    return "".join(text)


def prepare(install) -> tuple[Path, Path, Path]:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    deploy, new_net = BENCH_DIR / "vgg16.prototxt", BENCH_DIR / "vgg16_10.prototxt"
    model = BENCH_DIR / "vgg16.caffemodel"
    deploy.write_text(vgg16())
    new_net.write_text(vgg16(classes=10, head="fc8_new"))
    if not model.is_file():
        print(f"generating {model} with pycaffe (once)...", flush=True)
        code = "import sys, caffe; caffe.set_mode_cpu(); caffe.Net(sys.argv[1], caffe.TEST).save(sys.argv[2] + '.tmp')"
        env = install.env() | {"GLOG_minloglevel": "2"}
        subprocess.run([sys.executable, "-c", code, str(deploy), str(model)], env=env, check=True)
        os.replace(f"{model}.tmp", model)
    return deploy, new_net, model


# Runs the command as a child and reports its wall time and peak resident memory (ru_maxrss of that child only).
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": elapsed, "peak_bytes": peak_kb * 1024, "rc": result.returncode,
                      "stderr": result.stderr.decode()[-2000:]}))
""")


def measure(command: list[str], env: dict, before=lambda: None) -> dict:
    runs = []
    for _ in range(REPEATS):
        before()
        output = subprocess.run([sys.executable, "-c", MEASURE, *command], env=env, capture_output=True, text=True,
                                check=True)
        run = json.loads(output.stdout)
        if run["rc"] != 0:
            raise SystemExit(f"failed: {' '.join(command)}\n{run['stderr']}")
        runs.append(run)
    return min(runs, key=lambda r: r["seconds"]) | {"peak_bytes": max(r["peak_bytes"] for r in runs)}


def main() -> None:
    install = caffe_tools.find_caffe()
    deploy, new_net, model = prepare(install)
    size = model.stat().st_size
    env = install.env() | {"GLOG_minloglevel": "2"}
    grafted = BENCH_DIR / "grafted.caffemodel"
    pycaffe_load = [sys.executable, "-c", "import sys, caffe; caffe.set_mode_cpu(); "
                    "caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])", str(deploy), str(model)]
    caffetune = [sys.executable, "-m", "caffetune"]
    cases = {
        "inspect W.caffemodel": caffetune + ["inspect", str(model), "--json"],
        "inspect NET --weights W": caffetune + ["inspect", str(deploy), "--weights", str(model), "--no-pycaffe",
                                                "--json"],
        "inspect NET --weights W (pycaffe shapes)": caffetune + ["inspect", str(deploy), "--weights", str(model),
                                                                 "--json"],
        "graft (fc8 -> 10 classes, 3 kept)": caffetune + ["graft", "--from", str(model), "--net", str(new_net),
                                                          "-o", str(grafted), "--map", "fc8=fc8_new",
                                                          "--keep-classes", "1:0,7:3,999:9", "--json"],
    }
    print(f"caffemodel: {model} ({size / 1e6:.0f} MB), best of {REPEATS} runs, each in its own process")
    baseline = measure(pycaffe_load, env)
    print(f"{'pycaffe caffe.Net(deploy, weights)':<50} {baseline['seconds']:7.2f} s   "
          f"peak {baseline['peak_bytes'] / 1e6:6.0f} MB ({baseline['peak_bytes'] / size:.2f}x file)")
    for label, command in cases.items():
        # graft writes a new file each run (deleting a 550 MB file is the filesystem's cost, not graft's)
        run = measure(command, env, before=lambda: grafted.unlink(missing_ok=True))
        speedup = baseline["seconds"] / run["seconds"]
        print(f"{'caffetune ' + label:<50} {run['seconds']:7.2f} s   peak {run['peak_bytes'] / 1e6:6.0f} MB "
              f"({run['peak_bytes'] / size:.2f}x file)   speed-up vs pycaffe: {speedup:.1f}x")
    grafted.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
