r"""Seconds per 1024-px image for the R-MAC descriptor of VGG16 conv5_3 (docs/protocols.md §6).

Builds a random-init VGG16 (Sobel, ImageNet statistics), exports it as dc_tf.train would (about
0.5 GB, most of it fc6, in a temporary folder deleted afterwards), then times
`eval.rmac` on 1024x768 images: the export's conv_features signature, the 20 R-MAC regions of
the 64x48 conv5 map, a 512x512 whitening and the sum. One warm-up image first (tracing).
Prints one JSON object. The time depends on the cores TensorFlow gets; say how busy they were.

    python bench/retrieval_descriptor.py                 # 3 timed images
    python bench/retrieval_descriptor.py --num_images=5
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=3, help="timed images")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from dc_tf import export, models
    from dc_core.clustering import PCAWhitening
    from eval import rmac

    tmp = tempfile.mkdtemp(prefix="retrieval_bench_")
    try:
        start = time.time()
        backbone = models.build_backbone("vgg16", 224, 3, True, (0.485, 0.456, 0.406),
                                         (0.229, 0.224, 0.225), seed=0)
        path = export.export_saved_model(backbone, os.path.join(tmp, "export"), 224, 3,
                                         models.min_image_size("vgg16"))
        export_bytes = sum(os.path.getsize(os.path.join(d, f))
                           for d, _, files in os.walk(path) for f in files)
        del backbone
        build_s = time.time() - start
        conv = rmac.ConvExport(path, "conv5")
        rng = np.random.default_rng(0)
        # Smooth random photographs: noise upsampled 16x, so the map is not all one value.
        images = [tf.cast(tf.image.resize(rng.uniform(0, 255, (args.height // 16,
                                                               args.width // 16, 3)),
                                          [args.height, args.width]), tf.uint8)
                  for _ in range(args.num_images + 1)]
        whitening = PCAWhitening(mean=np.zeros(512, np.float32), matrix=np.linalg.qr(
            rng.normal(size=(512, 512)))[0].astype(np.float32))

        def descriptor(image):
            fmap = conv.feature_map(image)
            vectors = rmac.regional_vectors(fmap, "rmac", 3)
            return fmap.shape, len(vectors), rmac.aggregate(vectors, whitening)

        tick = time.time()
        shape, regions, _ = descriptor(images[0])
        warmup_s = time.time() - tick
        times = []
        for image in images[1:]:
            tick = time.time()
            descriptor(image)
            times.append(time.time() - tick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "arch": "vgg16", "sobel": True, "layer": "conv5 (conv5_3 after ReLU)",
        "image_hw": [args.height, args.width], "feature_map_hwc": list(shape),
        "rmac_regions": regions, "descriptor_dim": 512, "export_mb": round(export_bytes / 2**20),
        "build_and_export_s": round(build_s, 1), "warmup_s": round(warmup_s, 2),
        "seconds_per_image": round(float(np.mean(times)), 3),
        "per_image_s": [round(t, 3) for t in times], "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU"))}, indent=1))


if __name__ == "__main__":
    main()
