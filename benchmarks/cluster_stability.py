"""How stable the ``cluster`` partition's topic labels are across k-means seeds: adjusted Rand index (ARI).

    python benchmarks/cluster_stability.py [DATA_FILE] [--num-clusters 6] [--seeds 10]

Clusters the raw instruction and input of every row (as FederatedDataModule's ``partition="cluster"`` does) once
per seed and prints the mean and minimum ARI over all pairs of seeds (1.0: the same clusters whatever the seed).
For the repository's fixture, whose rows come from six templates, it also prints the ARI against those templates.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from lightning_parablock.data import DataSource, cluster_labels, load_examples

FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "alpaca_gpt4.json"
FIXTURE_TEMPLATES = (
    "What is the capital",
    "Give me a short cooking",
    "Write a Python",
    "Write a short poem",
    "Correct",
    "Add",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_file", nargs="?", default=str(FIXTURE))
    parser.add_argument("--num-clusters", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    rows = load_examples(DataSource(data_files=args.data_file), seed=0)
    texts = [f"{instruction} {input}" for instruction, input in zip(rows["instruction"], rows["input"])]
    runs = [cluster_labels(texts, args.num_clusters, seed) for seed in range(args.seeds)]
    pairs = [adjusted_rand_score(a, b) for a, b in itertools.combinations(runs, 2)]
    print(f"{len(texts)} rows of {args.data_file}, {args.num_clusters} clusters, seeds 0..{args.seeds - 1}")
    print(f"ARI between seeds: mean {np.mean(pairs):.3f}, min {np.min(pairs):.3f} over {len(pairs)} pairs")
    if Path(args.data_file).resolve() == FIXTURE.resolve():
        truth = [next(i for i, t in enumerate(FIXTURE_TEMPLATES) if text.startswith(t)) for text in texts]
        against = [adjusted_rand_score(truth, run) for run in runs]
        summary = f"mean {np.mean(against):.3f}, min {np.min(against):.3f}"
        print(f"ARI against the fixture's {len(FIXTURE_TEMPLATES)} templates: {summary}")


if __name__ == "__main__":
    main()
