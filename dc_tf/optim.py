"""DeepCluster-v2's optimisation (docs/protocols.md §9): the warm-up + cosine learning rate and
LARC's layer-wise trust ratio."""

import keras
import tensorflow as tf

from dc_tf import config


def scheduled(cfg: config.TrainConfig) -> bool:
    """Whether cfg's learning rate changes during training (else it is cfg.learning_rate)."""
    return cfg.warmup_epochs > 0 or cfg.final_learning_rate is not None


def learning_rate(cfg: config.TrainConfig, steps_per_epoch: int):
    """The rate of cfg's optimiser: a float (constant), or per step a linear warm-up from 0 over
    cfg.warmup_epochs and then a cosine from cfg.learning_rate to cfg.final_learning_rate over the
    remaining epochs (Keras's CosineDecay, evaluated at the optimiser's step count, so a resumed
    run continues the schedule where it stopped)."""
    if not scheduled(cfg):
        return cfg.learning_rate
    final = cfg.learning_rate if cfg.final_learning_rate is None else cfg.final_learning_rate
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else cfg.learning_rate,
        decay_steps=(cfg.epochs - cfg.warmup_epochs) * steps_per_epoch,
        alpha=final / cfg.learning_rate,
        warmup_target=cfg.learning_rate if warmup_steps else None, warmup_steps=warmup_steps)


def larc(grads: list, variables: list, weight_decay: float, trust: float,
         eps: float = 1e-8) -> list:
    """LARC without clipping (NVIDIA apex's, as DeepCluster-v2 uses it): each variable's gradient
    plus its weight decay, scaled by trust * |w| / (|g| + weight_decay * |w| + eps); a variable
    whose weight or gradient is zero keeps its plain gradient."""
    scaled = []
    for g, v in zip(grads, variables):
        w_norm, g_norm = tf.norm(v), tf.norm(g)
        ratio = trust * w_norm / (g_norm + weight_decay * w_norm + eps)
        both = tf.logical_and(w_norm > 0, g_norm > 0)
        scaled.append(tf.where(both, (g + weight_decay * v) * ratio, g))
    return scaled
