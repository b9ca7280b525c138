r"""Per-epoch clustering quality and cost of training runs, side by side (issue 23).

    python bench/epoch_curves.py --run=DeepCluster=runs/fashion_mnist \
        --run=DeepCluster-v2=runs/fashion_mnist_v2 --plot=bench/nmi_labels.png

Reads each run's metrics rows (and final clustering figures) and prints JSON: per run and epoch,
nmi_labels (head 0's clustering against the ground truth), nmi_prev, and the seconds spent
reclustering (feature pass + clustering) and training; per run, the reclustering's share of the
epoch's time. With --plot, draws nmi_labels per epoch (the final clustering as the last point).
"""

import argparse
import json

import numpy as np


def read_run(model_dir: str) -> dict:
    from dc_tf.run_dir import RunDir

    run = RunDir(model_dir)
    rows, final = run.read_metrics(), run.final_figures_or_none()
    recluster = [r.get("time_features_s", 0.0) + r.get("time_cluster_s", 0.0) for r in rows]
    train = [r["time_train_s"] for r in rows]
    return {
        "epochs": [r["epoch"] for r in rows],
        "nmi_labels": [r["nmi_labels"] for r in rows],
        "nmi_prev": [r["nmi_prev"] for r in rows],
        "final_nmi_labels": final["nmi_labels"],
        "recluster_s": recluster,
        "train_s": train,
        "recluster_share": float(np.sum(recluster) / (np.sum(recluster) + np.sum(train))),
        "epoch_s_mean": float(np.mean(np.add(recluster, train))),
    }


def plot(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, run in runs.items():
        x = run["epochs"] + [len(run["epochs"])]
        ax.plot(x, run["nmi_labels"] + [run["final_nmi_labels"]], marker="o", label=name)
    ax.set_xlabel("epoch (last point: the final clustering)")
    ax.set_ylabel("nmi_labels (head 0 vs. classes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=MODEL_DIR")
    parser.add_argument("--plot", default="", help="PNG to draw nmi_labels per epoch into")
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        name, sep, model_dir = spec.rpartition("=")
        if not sep:
            parser.error(f"--run={spec}: give NAME=MODEL_DIR")
        runs[name] = read_run(model_dir)
    if args.plot:
        plot(runs, args.plot)
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
