"""The pipelines, as small Python definitions: `PIPELINES[name](data_dir)` builds one.

    smoke             flags/smoke.cfg (512 images): DeepCluster, Random, Supervised, a 1-epoch
                      probe, the report. Seconds; the test runs it.
    fashion_mnist     flags/fashion_mnist.cfg for all three models, the probes on
                      Fashion-MNIST train -> test, the report. 38 minutes on 2 CPU cores
                      (bench/RESULTS.md §7).
    imagenet_alexnet  the paper's run: flags/alexnet.cfg on tfds:imagenet2012, probes on ImageNet
                      and Places205's successor in TFDS (places365_small), 90 epochs each with
                      the protocol's augmentation and ten crops; and, as the paper's Table 5,
                      VGG16 (flags/vgg16.cfg) trained the same three ways and evaluated on
                      Oxford5k / Paris6k and their revisited versions. Needs --data_dir with
                      both TFDS datasets prepared, VOC 2007 in DATA_DIR/VOCdevkit/VOC2007 (for
                      Table 2: classification fc6-8 and all, detection) and the retrieval data
                      in DATA_DIR/retrieval (the layout of eval/retrieval.py).
"""

import os

from pipelines.components import Baseline, Evaluation, LinearProbe, Pretrain, Report
from pipelines.engine import Pipeline
from pipelines.report import Threshold


def _models(flagfile: str, flags: tuple, prefix: str = "") -> dict:
    """Random, DeepCluster and Supervised trained from the same flagfile: the paper's rows.
    Component names get `prefix` (a second architecture in one pipeline); row labels do not."""
    return {"Random": Baseline(f"{prefix}Random", "random", flagfile, flags),
            "DeepCluster": Pretrain(f"{prefix}DeepCluster", flagfile, flags),
            "Supervised": Baseline(f"{prefix}Supervised", "supervised", flagfile, flags)}


def _pipeline(name: str, models: dict, probes: list, report: Report) -> Pipeline:
    return Pipeline(name, (*models.values(), *probes, report))


def _exports(models: dict) -> dict:
    return {label: m.output("export") for label, m in models.items()}


def _model_dirs(models: dict) -> dict:
    return {label: m.output("model_dir") for label, m in models.items()}


# "DeepCluster kNN top-1 >= Random + 1 point": the features must beat the untrained network.
_BEATS_RANDOM_KNN = Threshold("DeepCluster", "knn_top1", baseline="Random", margin=0.01)


def smoke(data_dir: str = "") -> Pipeline:
    """Seconds-long end-to-end run for tests: flags/smoke.cfg and a 1-epoch probe."""
    flags = (f"--data_dir={data_dir}",) if data_dir else ()
    models = _models("flags/smoke.cfg", flags)
    probe = LinearProbe("LinearProbe", _exports(models), "fashion_mnist", "fashion_mnist:test",
                        data_dir, epochs=1, max_examples=512, max_test_examples=256,
                        batch_size=64)
    report = Report("Report", "DeepCluster smoke run (512 Fashion-MNIST images)",
                    {"Fashion-MNIST": probe.output("metrics")}, _model_dirs(models),
                    thresholds=(_BEATS_RANDOM_KNN,
                                Threshold("Supervised", "top1_best:conv3", margin=0.2)))
    return _pipeline("smoke", models, [probe], report)


def fashion_mnist(data_dir: str = "") -> Pipeline:
    """The embedded default: the paper's Table 1 protocol on Fashion-MNIST."""
    flags = (f"--data_dir={data_dir}",) if data_dir else ()
    models = _models("flags/fashion_mnist.cfg", flags)
    probe = LinearProbe("LinearProbe", _exports(models), "fashion_mnist", "fashion_mnist:test",
                        data_dir)
    report = Report("Report", "DeepCluster on Fashion-MNIST (flags/fashion_mnist.cfg)",
                    {"Fashion-MNIST": probe.output("metrics")}, _model_dirs(models),
                    thresholds=(_BEATS_RANDOM_KNN,
                                Threshold("DeepCluster", "top1_best:conv3", baseline="Random",
                                          margin=0.01)))
    return _pipeline("fashion_mnist", models, [probe], report)


def imagenet_alexnet(data_dir: str = "") -> Pipeline:
    """The paper's run: AlexNet-BN + Sobel on ImageNet, Table 1 probes on ImageNet and Places."""
    flags = (f"--data_dir={data_dir}",) if data_dir else ()
    models = _models("flags/alexnet.cfg", flags)
    # docs/protocols.md §3: 90 epochs, resize 256 + random crop and flip, ten crops at test time.
    protocol = dict(epochs=90, augment=True, ten_crop=True)
    probes = [
        LinearProbe("LinearProbeImageNet", _exports(models), "tfds:imagenet2012:train",
                    "tfds:imagenet2012:validation", data_dir, **protocol),
        LinearProbe("LinearProbePlaces", _exports(models), "tfds:places365_small:train",
                    "tfds:places365_small:validation", data_dir, **protocol)]
    # Table 2: VOC 2007 classification (fc6-8, all) and detection with the AlexNet exports.
    voc = os.path.join(data_dir, "VOCdevkit", "VOC2007")
    evaluations = {
        "VOC07 classification, fc6-8": Evaluation("VOCClassificationFc68", "voc_classification",
                                                  _exports(models), voc=voc, mode="fc6_8"),
        "VOC07 classification, all": Evaluation("VOCClassificationAll", "voc_classification",
                                                _exports(models), voc=voc, mode="all"),
        "VOC07 detection, all": Evaluation("VOCDetection", "voc_detection", _exports(models),
                                           voc=voc, mode="all")}
    # Table 5: VGG16 conv5_3, R-MAC at 1024 px, whitening learned on the other dataset.
    vgg16 = _models("flags/vgg16.cfg", flags, prefix="VGG16")
    for title, name in (("Oxford5k", "oxford5k"), ("Paris6k", "paris6k"),
                        ("ROxford5k", "roxford5k"), ("RParis6k", "rparis6k")):
        evaluations[f"Retrieval: {title}"] = Evaluation(
            f"Retrieval{title}", "retrieval", _exports(vgg16), dataset=name,
            data_dir=os.path.join(data_dir, "retrieval"))
    runs = {**_model_dirs(models),
            **{f"VGG16 {label}": d for label, d in _model_dirs(vgg16).items()}}
    report = Report(
        "Report", "DeepCluster AlexNet-BN on ImageNet (flags/alexnet.cfg), VGG16 retrieval",
        {"ImageNet": probes[0].output("metrics"), "Places": probes[1].output("metrics")},
        runs,
        thresholds=(_BEATS_RANDOM_KNN,
                    # Paper Table 1: conv5 38.2 (DeepCluster) vs 14.1 (random) on ImageNet.
                    Threshold("DeepCluster", "top1_best:conv5", baseline="Random", margin=0.10,
                              probe="ImageNet")),
        evaluations={title: e.output("metrics") for title, e in evaluations.items()})
    return Pipeline("imagenet_alexnet", (*models.values(), *vgg16.values(), *probes,
                                         *evaluations.values(), report))


PIPELINES = {"smoke": smoke, "fashion_mnist": fashion_mnist,
             "imagenet_alexnet": imagenet_alexnet}
