"""``make demo``: the whole product on a small synthetic model, end to end, on a CPU.

1. a synthetic dataset in the original precomp layout (captions describe the objects in the regions);
2. a short training of a small SCAN with the original loss (cached: reruns skip it);
3. export to ONNX with parity checks (``export/to_onnx.py``);
4. the test split's pictures (small PNGs) and region boxes (``bench/demo/render.py``), and its image and
   caption galleries with the boxes (``runtime/search.py --boxes``);
5. a few text queries, why the top hit of one matched (``--explain``), one image query, and the recall
   table through the runtime (``bench/recall.py``), in float32 and with the float16 graphs;
6. how to serve it with the search page (``runtime/serve.py ... --image-dir``).

    python -m bench.demo [--out demo] [--retrain]
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

import numpy as np

from runtime.install import TORCH_CPU, install_command
from runtime.logs import command_parser, setup_logging

QUERIES = ["a red dog", "a small blue car next to a large tree", "a man on a bicycle"]
# What the demo needs beyond the base install: training (torch), export (onnx, onnxscript), search (onnxruntime).
NEEDS = ("torch", "onnx", "onnxscript", "onnxruntime")


def missing_modules() -> list[str]:
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__.split("\n\n")[0], prog="python -m bench.demo")  # run with -m: argv[0] is __main__.py
    p.add_argument("--out", default="demo", help="working folder")
    p.add_argument("--retrain", action="store_true", help="train again even if a cached checkpoint matches")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, args.log_format)
    missing = missing_modules()
    if missing:
        print(
            f"error: the demo needs {', '.join(missing)}, not installed here: `make demo` installs them, or "
            f"{TORCH_CPU} && {install_command('cpu', 'export')}",
            file=sys.stderr,
        )
        return 2
    # Imported once the check passed: each of these imports torch or onnx.
    from bench.demo.data import data_dir, make_dataset
    from bench.demo.render import BOXES_NAME, render_split
    from bench.demo.train import keep_freed_memory, train_demo
    from bench.recall import main as recall
    from export.to_onnx import main as to_onnx
    from runtime.search import main as search

    keep_freed_memory()
    out = Path(args.out)
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        print(f"\n== [{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    step("synthetic dataset")
    make_dataset(out)
    data = data_dir(out)
    step("drawing the test pictures and their region boxes")
    pictures = out / "pictures"
    picture_names, _ = render_split(out, "test", pictures)
    step("training a small SCAN (cached after the first run)")
    ckpt = train_demo(out, retrain=args.retrain)
    step("exporting to ONNX and checking parity")
    engines = out / "engines"
    if to_onnx([str(ckpt), "--out", str(engines)]) != 0:
        return 1
    manifest = str(engines / "scan.json")
    test_ims = data / "test_ims.npy"
    names = out / "test_names.txt"
    names.write_text("\n".join(picture_names) + "\n")
    np.save(out / "query_image.npy", np.load(test_ims)[:1])
    gallery = ["--engine", manifest, "--gallery", str(out / "gallery")]
    split = ["--engine", manifest, "--data", str(data), "--split", "test"]
    sources = ["--images", str(test_ims), "--names", str(names), "--boxes", str(pictures / BOXES_NAME)]
    sources += ["--captions", str(data / "test_caps.txt")]
    runs = [
        ("building the test galleries", search, [*gallery, "--rebuild", *sources]),
        ("text -> image queries", search, [*gallery, "-k", "3", *QUERIES]),
        (
            "why the top hit matched: each word's top regions (--explain)",
            search,
            [*gallery, "--image-dir", str(pictures), "-k", "1", "--explain", QUERIES[0]],
        ),
        (
            "image -> text: test image 0 (its own captions are lines 0-4 of test_caps.txt)",
            search,
            [*gallery, "-k", "5", "--query-images", str(out / "query_image.npy")],
        ),
        ("recall on the test split (float32 graphs, the original protocol)", recall, split),
        (
            "recall with a float16 gallery cache (half the memory), float32 graphs",
            recall,
            [*split, "--gallery-dtype", "float16"],
        ),
        (
            "recall with the float16 graphs (what a TensorRT FP16 engine computes)",
            recall,
            [*split, "--precision", "fp16", "--gallery-dtype", "float16"],
        ),
    ]
    for message, cli, cli_args in runs:
        step(message)
        if cli(cli_args) != 0:
            return 1
    step(f"done: model {ckpt}, engines {engines}/, galleries {out / 'gallery'}/, pictures {pictures}/")
    print(
        "\nSearch it in a browser (the search page, with the pictures and each word's regions):\n"
        f"  python runtime/serve.py --engine {manifest} --gallery {out / 'gallery'} --image-dir {pictures}\n"
        "  then open http://127.0.0.1:8080/?q=a+red+dog"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
