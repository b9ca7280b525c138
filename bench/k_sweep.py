r"""How the number of clusters k changes what DeepCluster learns on Fashion-MNIST.

For each k, trains flags/fashion_mnist.cfg with the same short budget on a subset, then measures
the export: cosine kNN top-1 (k=20, T=0.07) on fc7 from the training subset to the test split,
and the NMI of the run's final clustering with the labels. Prints one JSON object.

    python bench/k_sweep.py                                  # k in 10 30 100 300 1000
    python bench/k_sweep.py --ks=10,100 --max_examples=5000 --epochs=2
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def knn_top1(export: str, train_dataset: str, test_dataset: str, max_examples: int) -> float:
    """kNN top-1 on fc7 of the export, training subset -> test split."""
    from dc_tf import data
    from eval import features, linear_probe, metrics

    backbone = features.ExportedBackbone(export)
    with tempfile.TemporaryDirectory() as tmp:
        store = features.FeatureStore(8 * 2**30, tmp)
        split = {}
        for name, dataset in (("train", train_dataset), ("test", test_dataset)):
            source = data.open_source(dataset, "", max_examples if name == "train" else 0)
            split[name] = features.extract_features(backbone, source, ("fc7",),
                                                    backbone.image_size, False, 256, store, name)
        train, test = split["train"], split["test"]
        votes = linear_probe.knn_scores(train.arrays["fc7"], train.labels, test.arrays["fc7"],
                                        k=20, temperature=0.07, num_classes=10)
        return metrics.top_k_accuracy(votes, test.labels, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="10,30,100,300,1000")
    parser.add_argument("--max_examples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from dc_tf import train, train_flags
    from dc_tf.run_dir import RunDir

    os.chdir(ROOT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(v) for v in args.ks.split(",")):
            start = time.time()
            cfg = train.run(train_flags.config_from_argv([
                "k_sweep", "--flagfile=flags/fashion_mnist.cfg", f"--num_clusters={k}",
                f"--max_examples={args.max_examples}", f"--epochs={args.epochs}",
                f"--model_dir={tmp}/k{k}"]))
            final = RunDir(cfg.model_dir).final_figures_or_none()
            rows.append({"k": k, "knn_top1_fc7": round(knn_top1(
                RunDir(cfg.model_dir).export, "fashion_mnist", "fashion_mnist:test",
                args.max_examples), 4), "nmi_labels_final": round(final["nmi_labels"], 4),
                "seconds": round(time.time() - start, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"benchmark": "k_sweep", "command": "python bench/k_sweep.py "
                      + " ".join(sys.argv[1:]), "max_examples": args.max_examples,
                      "epochs": args.epochs, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
