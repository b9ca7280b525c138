"""TFX-style pipelines: pretrain -> export -> evaluators -> report, cached, in one command.

    python -m pipelines.run --pipeline=fashion_mnist --root=runs/pipeline_fmnist

artifacts.py    typed artifacts (DatasetRef, ModelDir, Export, Metrics, Report) and fingerprints
engine.py       components, pipelines, metadata records, caching, the run loop
components.py   Pretrain, Baseline, LinearProbe, Report: wrappers of library entry points
report.py       report.md / report.html, plots, blessing thresholds
definitions.py  the smoke, fashion_mnist and imagenet_alexnet pipelines
run.py          the command line
"""
