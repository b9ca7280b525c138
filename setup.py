"""dc_tf: DeepCluster (Caron et al., ECCV 2018) in TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="dc_tf",
    version="0.1.0",
    description="DeepCluster: unsupervised visual features by clustering, in TensorFlow 2 / Keras 3",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dc_core", "dc_core.*", "dc_tf", "dc_tf.*", "eval", "eval.*",
                                    "pipelines", "pipelines.*"]),
    install_requires=[
        "tensorflow>=2.16,<3",  # 2.16 is the first release on Keras 3
        "keras>=3.3,<4",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # imported by tensorflow-datasets 4.9.10 without declaring it
        "faiss-cpu>=1.7.4",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tensorboard>=2.16",
        "scikit-learn>=1.3",
        "scipy>=1.11",
        "threadpoolctl>=3.1",  # one BLAS thread during the feature pass (dc_tf/features.py)
        "matplotlib>=3.7",  # the pipelines' report plots
        "pillow>=10",  # montages of clusters, filters and retrieval results
        "keras-hub>=0.32,<0.33",  # eval.voc_detection: RetinaNet, its FPN, anchors and losses
    ],
    extras_require={
        "gpu": ["faiss-gpu>=1.8", "tensorflow[and-cuda]>=2.16,<3"],
        # selenium: the report page in Chromium; pytest-xdist: the suite on two workers
        "dev": ["pytest>=7", "pytest-xdist>=3", "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["dc-tf-train=dc_tf.train:entry_point",
                                       "dc-tf-visualize=dc_tf.visualize:entry_point"]},
)
