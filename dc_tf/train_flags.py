"""The command-line flags of `python -m dc_tf.train`: the only module that defines or reads FLAGS.

Flag names equal `TrainConfig` field names. Flagfiles (`--flagfile=flags/alexnet.cfg`) may include
other flagfiles; the last value given wins, so flags after the flagfile override it.
"""

from absl import flags

from dc_tf import config

_D = config.TrainConfig()


def _pair(values) -> str:
    return ",".join(str(v) for v in values)


flags.DEFINE_string("method", _D.method,
                    "deepcluster (Caron et al. 2018: feature pass, PCA, k-means, balanced sampling, "
                    "a fresh top layer each epoch) or deepcluster_v2 (projection head, prototypes "
                    "from spherical k-means of a memory bank, multi-crop). Flags of the other "
                    "method are refused.")
flags.DEFINE_string("dataset", _D.dataset,
                    "fashion_mnist[:SPLIT], tfds:NAME[:SPLIT] (prepared in --data_dir) or "
                    "folder:PATH (every image below PATH; class sub-folders become monitoring labels).")
flags.DEFINE_string("data_dir", _D.data_dir,
                    "Where the data lives: Fashion-MNIST IDX files, or a TFDS data dir.")
flags.DEFINE_integer("max_examples", _D.max_examples, "Use only the first N examples (0 = all).")
flags.DEFINE_string("arch", _D.arch, f"Backbone: {', '.join(config.ARCHS)}.")
flags.DEFINE_bool("sobel", _D.sobel, "Grayscale + fixed Sobel filters in front of the network.")
flags.DEFINE_integer("image_size", _D.image_size, "Training and feature crop size in pixels.")
flags.DEFINE_integer("resize_size", _D.resize_size,
                     "Feature pass: resize the shorter side to this, then centre-crop --image_size.")
flags.DEFINE_list("mean", _pair(_D.mean), "Per-channel mean of pixels in [0, 1].")
flags.DEFINE_list("std", _pair(_D.std), "Per-channel standard deviation of pixels in [0, 1].")
flags.DEFINE_list("crop_scale", _pair(_D.crop_scale), "Random resized crop: area fraction min,max.")
flags.DEFINE_list("crop_ratio", _pair(_D.crop_ratio), "Random resized crop: aspect ratio min,max.")
flags.DEFINE_integer("num_clusters", _D.num_clusters, "k, the number of clusters (paper: 10000); 0: one per 40 images, "
                     "between 2 and 100.")
flags.DEFINE_string("clustering", _D.clustering, "kmeans or pic.")
flags.DEFINE_integer("pca_dim", _D.pca_dim, "PCA-whitening dimension before clustering (0 = no PCA).")
flags.DEFINE_integer("pca_sample", _D.pca_sample, "Number of images the PCA is fitted on.")
flags.DEFINE_integer("kmeans_iters", _D.kmeans_iters, "k-means iterations (paper: 20).")
flags.DEFINE_string("kmeans_mode", _D.kmeans_mode,
                    "exact (the paper: Lloyd iterations over all k centroids), shortlist (Lloyd "
                    "iterations where each example is compared with its 16 nearest centroids of "
                    "one exact search, refreshed once for the farthest 30 %: the fast mode for "
                    "large k on CPUs, objective within 1 % of exact) or two_level (FAISS's "
                    "two-level clustering, sqrt(k) cells then k-means inside each, refined by one "
                    "exact step: objective up to 1 % higher on real features, 5 % on synthetic "
                    "blobs). bench/RESULTS.md §8 has the figures; on a GPU, exact is the fastest.")
flags.DEFINE_list("num_prototypes", _pair(_D.num_prototypes),
                  "DeepCluster-v2: prototypes of each head, one k per head (ImageNet: 3000,3000,3000).")
flags.DEFINE_list("projection_dims", _pair(_D.projection_dims),
                  "DeepCluster-v2: hidden,output widths of the projection head (ResNet-50: 2048,128).")
flags.DEFINE_float("temperature", _D.temperature,
                   "DeepCluster-v2: softmax temperature of the prototype scores (0.1).")
flags.DEFINE_integer("global_crops", _D.global_crops,
                     "DeepCluster-v2: global crops per image at --image_size; the first two "
                     "are written to the memory bank (2).")
flags.DEFINE_list("global_crop_scale", _pair(_D.global_crop_scale),
                  "DeepCluster-v2: area fraction min,max of the global crops (0.14,1).")
flags.DEFINE_integer("local_crops", _D.local_crops,
                     "DeepCluster-v2: small crops per image besides the global ones (6).")
flags.DEFINE_integer("local_crop_size", _D.local_crop_size,
                     "DeepCluster-v2: side of the local crops in pixels (96).")
flags.DEFINE_list("local_crop_scale", _pair(_D.local_crop_scale),
                  "DeepCluster-v2: area fraction min,max of the local crops (0.05,0.14).")
flags.DEFINE_float("color_jitter", _D.color_jitter,
                   "DeepCluster-v2: colour distortion strength s of every crop: brightness, "
                   "contrast (and for colour images saturation, hue, grayscale) with p = 0.8 "
                   "(swav: 1; 0 = off).")
flags.DEFINE_bool("blur", _D.blur,
                  "DeepCluster-v2: Gaussian blur of every crop with p = 0.5, sigma 0.1-2 px per "
                  "224 px of the crop's side (swav).")
flags.DEFINE_float("feature_spread", _D.feature_spread,
                   "DeepCluster-v2, dc_tf's addition: weight of -log of the participation ratio "
                   "over each batch of fc6 and of fc7 (ResNet-50: the pooled features), which "
                   "keeps them from collapsing onto a few directions (0: the published "
                   "objective).")
flags.DEFINE_integer("warmup_epochs", _D.warmup_epochs,
                     "DeepCluster-v2: epochs of linear warm-up of the learning rate from 0 (10).")
flags.DEFINE_float("final_learning_rate", _D.final_learning_rate,
                   "DeepCluster-v2: the rate a cosine schedule ends at after the warm-up "
                   "(ImageNet: 0.0048 from 4.8); unset: the rate stays --learning_rate.")
flags.DEFINE_bool("lars", _D.lars,
                  "DeepCluster-v2: LARC around SGD, each variable's step scaled by the trust "
                  "ratio of its weight and gradient norms (the ImageNet recipe).")
flags.DEFINE_float("lars_trust_coefficient", _D.lars_trust_coefficient,
                   "DeepCluster-v2: LARC's trust coefficient (0.001).")
flags.DEFINE_integer("epochs", _D.epochs, "Number of epochs (paper: 500).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Batch size (paper: 256).")
flags.DEFINE_float("learning_rate", _D.learning_rate,
                   "SGD learning rate: constant for DeepCluster (paper: 0.05); the peak of the "
                   "schedule for DeepCluster-v2 (see --warmup_epochs, --final_learning_rate).")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum of the backbone (paper: 0.9).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "Coupled L2 coefficient (paper: 1e-5).")
flags.DEFINE_integer("reassign", _D.reassign, "Epochs between two reclusterings (paper: 1).")
flags.DEFINE_integer("seed", _D.seed, "One seed for everything (paper: 31).")
flags.DEFINE_string("model_dir", _D.model_dir, "Output folder; re-running with it resumes.")
flags.DEFINE_bool("overwrite", False,
                  "Delete a run with another configuration found in --model_dir instead of "
                  "refusing to start.")
flags.DEFINE_bool("supervised", _D.supervised,
                  "Baseline: train on the dataset's labels (one output per class, --num_clusters "
                  "ignored) with the same network, sampling and budget. --epochs=0 exports the "
                  "untrained network (the Random baseline).")
flags.DEFINE_bool("jit_compile", _D.jit_compile,
                  "Compile the training step with XLA (speed only; may change when resuming). "
                  "bench/RESULTS.md §2 has its effect on the default run.")
flags.DEFINE_bool("mixed_precision", _D.mixed_precision,
                  "Compute in bfloat16 with float32 variables (Keras policy mixed_bfloat16; no loss "
                  "scaling needed). Speed only; may change when resuming.")
flags.DEFINE_string("strategy", _D.strategy,
                    "default (one device), mirrored (tf.distribute.MirroredStrategy over the local "
                    "GPUs) or multi_worker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG). "
                    "--batch_size is the global batch.")


def _floats(flag: str, values, length=None) -> tuple:
    try:
        out = tuple(float(v) for v in values)
    except ValueError:
        raise config.ConfigError(f"--{flag}={','.join(values)}: give comma-separated numbers") from None
    if length is not None and len(out) != length:
        raise config.ConfigError(f"--{flag}={','.join(values)}: give {length} comma-separated numbers")
    return out


def _ints(flag: str, values) -> tuple:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise config.ConfigError(f"--{flag}={','.join(values)}: give comma-separated "
                                 "integers") from None


def _refuse_other_methods_flags(method: str) -> None:
    """A flag of the other method, given on the command line or in a flagfile, would be
    silently ignored: refuse it instead."""
    given = [name for other, names in config.METHOD_FLAGS.items() if other != method
             for name in names if flags.FLAGS[name].present]
    if given and method in config.METHOD_FLAGS:
        raise config.ConfigError(
            f"--method={method} does not use {', '.join('--' + g for g in given)}: remove "
            f"{'it' if len(given) == 1 else 'them'} (from the command line or the flagfile)")


def config_from_flags() -> config.TrainConfig:
    """Builds the frozen config from the parsed FLAGS (call from main only)."""
    f = flags.FLAGS
    _refuse_other_methods_flags(f.method)
    return config.TrainConfig(
        method=f.method, dataset=f.dataset, data_dir=f.data_dir, max_examples=f.max_examples, arch=f.arch,
        sobel=f.sobel, image_size=f.image_size, resize_size=f.resize_size,
        mean=_floats("mean", f.mean), std=_floats("std", f.std),
        crop_scale=_floats("crop_scale", f.crop_scale, 2),
        crop_ratio=_floats("crop_ratio", f.crop_ratio, 2),
        num_clusters=f.num_clusters, clustering=f.clustering, pca_dim=f.pca_dim,
        pca_sample=f.pca_sample, kmeans_iters=f.kmeans_iters, kmeans_mode=f.kmeans_mode,
        epochs=f.epochs,
        batch_size=f.batch_size, learning_rate=f.learning_rate, momentum=f.momentum,
        weight_decay=f.weight_decay, reassign=f.reassign, seed=f.seed, model_dir=f.model_dir,
        supervised=f.supervised, jit_compile=f.jit_compile, mixed_precision=f.mixed_precision,
        strategy=f.strategy, num_prototypes=_ints("num_prototypes", f.num_prototypes),
        projection_dims=_ints("projection_dims", f.projection_dims), temperature=f.temperature,
        global_crops=f.global_crops,
        global_crop_scale=_floats("global_crop_scale", f.global_crop_scale, 2),
        local_crops=f.local_crops, local_crop_size=f.local_crop_size,
        local_crop_scale=_floats("local_crop_scale", f.local_crop_scale, 2),
        warmup_epochs=f.warmup_epochs, final_learning_rate=f.final_learning_rate, lars=f.lars,
        lars_trust_coefficient=f.lars_trust_coefficient, color_jitter=f.color_jitter,
        blur=f.blur, feature_spread=f.feature_spread)


def config_from_argv(argv: list) -> config.TrainConfig:
    """Parses a command line (argv[0] is the program name) into a validated config.

    Relative --flagfile paths are resolved against the current directory, as on the shell.
    """
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    return config.validate(config_from_flags())
