"""How much batching buys `eval`: questions per second at --batch-size 1, 4, 8 and 16 on the toy checkpoint.

    .venv/bin/python tests/bench_eval.py [--clips 8] [--runs 3]

Each run evaluates the same toy dataset (clips x 4 questions, the paper's protocol but --prompt "{}", as the toy was
trained) into a fresh predictions file; the best of --runs is kept, because the machine may be shared. The load
average is printed beside each row. Not a test: speed is measured here, never asserted.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import minivb  # noqa: E402
from minivb import data, evaluate  # noqa: E402

TOY = os.path.join(os.path.dirname(__file__), "..", "weights", "toy-vicuna")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    model = minivb.load_model(TOY, dtype=getattr(torch, args.dtype))
    processor = minivb.load_processor(TOY)
    with tempfile.TemporaryDirectory(prefix="minivb-bench-eval-") as folder:
        entries = data.read_annotations(data.write_toy_dataset(folder, args.clips), os.path.join(folder, "videos"))
        print(f"{len(entries)} questions, {args.dtype}, {args.num_workers} DataLoader workers, "
              f"{torch.get_num_threads()} torch threads, best of {args.runs}")
        print(f"{'batch':>5} {'seconds':>8} {'questions/s':>12} {'vs batch 1':>10}  accuracy  load average")
        base = None
        for batch_size in args.batch_sizes:
            best, loads = float("inf"), []
            for run in range(args.runs):
                out = os.path.join(folder, f"b{batch_size}-{run}.jsonl")
                started = time.perf_counter()
                summary = evaluate.evaluate(model, processor, entries, os.path.join(folder, "videos"), out,
                                            prompt="{}", batch_size=batch_size, num_workers=args.num_workers,
                                            show_progress=False)
                best = min(best, time.perf_counter() - started)
                loads.append(os.getloadavg()[0])
            base = base or best
            print(f"{batch_size:>5} {best:>8.2f} {len(entries) / best:>12.2f} {base / best:>9.2f}x  "
                  f"{summary['accuracy']:>7.1%}  {' '.join(f'{load:.1f}' for load in loads)}", flush=True)


if __name__ == "__main__":
    main()
