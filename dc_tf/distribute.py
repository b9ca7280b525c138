"""Scale-out with tf.distribute: the strategy of `--strategy`, and who writes what.

    python -m dc_tf.train --flagfile=flags/fashion_mnist.cfg --strategy=mirrored --model_dir=D
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]},
                "task": {"type": "worker", "index": 0}}' \
      python -m dc_tf.train --flagfile=... --strategy=multi_worker --model_dir=D  # on each host

`mirrored` is MirroredStrategy over the local GPUs (or, on a machine without any, over the
logical CPU devices when more than one is configured); `multi_worker` is
MultiWorkerMirroredStrategy over the cluster of TF_CONFIG. Training and the feature pass are
sharded over the replicas; the clustering runs once, on the chief, and reaches every worker
through a collective (`from_chief`).

Training data comes from one input pipeline per worker (`per_worker_datasets`): each draws the
same balanced index stream and decodes only its share of it.

`Workers` holds all of it for a run: the strategy, who the chief is, where each process writes,
and the collectives that keep the workers in step.

Only the chief owns MODEL_DIR. Every other worker writes what it would write there (its
checkpoints, the assignments it trained on, its metrics) into its own scratch folder
MODEL_DIR/workertemp_<task id>, the convention of Keras's multi-worker callbacks, and restores
from the chief's checkpoints: MODEL_DIR must be on storage that every worker can read, as for
Keras's BackupAndRestore.
"""

import contextlib
import json
import os

import faiss
import tensorflow as tf
from absl import logging

from dc_tf import config, failpoints, resume
from dc_tf.run_dir import RunDir

_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                      '"task": {"type": "worker", "index": 0}}\'')


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy of `--strategy=name`; create it before any other TF work.

    MultiWorkerMirroredStrategy configures the collective runtime, which has to happen before
    TensorFlow initialises its devices.

    Raises:
      config.ConfigError: for multi_worker, TF_CONFIG is missing or malformed.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        logging.info("strategy: %d replicas (MirroredStrategy over %s)",
                     strategy.num_replicas_in_sync, ", ".join(devices))
        return strategy
    task = _check_tf_config(os.environ.get("TF_CONFIG"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logging.info("strategy: %d replicas (MultiWorkerMirroredStrategy, this is %s:%d%s)",
                 strategy.num_replicas_in_sync, task["type"], task["index"],
                 ", the chief" if is_chief(strategy) else "")
    return strategy


def _check_tf_config(text) -> dict:
    """The task of a well-formed TF_CONFIG; ConfigError naming the fix otherwise."""
    def fail(why):
        raise config.ConfigError(f"--strategy=multi_worker: {why}; set TF_CONFIG on every worker, "
                                 f"e.g. {_TF_CONFIG_EXAMPLE} (or use --strategy=mirrored on one "
                                 "machine)")

    if not text:
        fail("the environment variable TF_CONFIG is not set")
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"TF_CONFIG is not JSON ({e})")
    if not isinstance(tf_config, dict):
        fail(f"TF_CONFIG must be a JSON object, not {text!r}")
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        fail("TF_CONFIG has no \"cluster\" (the host:port of every worker)")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        fail("TF_CONFIG has no \"task\" with a \"type\" and an \"index\" (which worker this is)")
    hosts = cluster.get(task["type"])
    if not isinstance(hosts, list) or not isinstance(task["index"], int) or not (
            0 <= task["index"] < len(hosts)):
        fail(f"TF_CONFIG's task {task['type']}:{task['index']} is not in its cluster "
             f"{json.dumps(cluster)}")
    return task


def is_distributed(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is one of --strategy=mirrored / multi_worker's (not the default)."""
    return isinstance(strategy, (tf.distribute.MirroredStrategy,
                                 tf.distribute.MultiWorkerMirroredStrategy))


def variable_scope(strategy: tf.distribute.Strategy):
    """Where training creates its variables: the strategy's scope, so they are mirrored.

    No scope at all for the default strategy, so a one-device run is exactly what it is without
    tf.distribute. Leave it before creating variables that only the chief creates (the export's):
    a variable created in a multi-worker scope is a collective, broadcast from the chief.
    """
    return strategy.scope() if is_distributed(strategy) else contextlib.nullcontext()


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy spans several workers (processes), not just local devices."""
    return is_distributed(strategy) and (
        strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process owns MODEL_DIR: always, except on the non-chief workers."""
    return strategy.extended.should_checkpoint


def write_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where this process writes: MODEL_DIR on the chief, its own scratch folder elsewhere."""
    if is_chief(strategy):
        return model_dir
    return RunDir(model_dir).worker_scratch(strategy.cluster_resolver.task_id).path


def check_batch_size(strategy: tf.distribute.Strategy, batch_size: int) -> None:
    """The global batch must split evenly over the replicas (each replica gets an equal share)."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise config.ConfigError(
            f"--batch_size={batch_size}: the global batch must split evenly over the {replicas} "
            f"replicas of the strategy; use a multiple of {replicas}")


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` sharded by element over the workers, whatever its source.

    For the feature pass: every worker reads the same fixed order and keeps its share of each
    global batch, so the global batches are those of a single-device run and the gathered rows
    arrive in the same order everywhere. (AUTO would shard a file-based source by file, giving
    workers unequal and differently ordered streams.)
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def per_worker_datasets(strategy: tf.distribute.Strategy, make_dataset, global_batch: int):
    """The training stream as one input pipeline per worker, each decoding only its share.

    `make_dataset(per_replica_batch, (num_pipelines, pipeline_id))` must build batches for one
    replica from its shard of an index stream that every pipeline draws identically (the
    balanced sampler's). Sharding indices before decoding, rather than letting auto-sharding
    drop the other workers' elements of decoded global batches, keeps each image decoded once.
    """
    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return make_dataset(context.get_per_replica_batch_size(global_batch),
                            (context.num_input_pipelines, context.input_pipeline_id))
    return strategy.distribute_datasets_from_function(dataset_fn)


def from_chief(strategy: tf.distribute.Strategy, values):
    """The chief's `values` (a nest of numeric tensors), on every worker.

    Multi-worker only: the chief's first replica (global replica 0) contributes its values and
    every other replica zeros to one all-reduce. Elsewhere `values` are already the chief's and
    come back unchanged. Every worker must call it at the same point, eagerly or in a function.
    """
    if not is_multi_worker(strategy):
        return values
    values = tf.nest.map_structure(tf.convert_to_tensor, values)

    def chief_only(values):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        # One all-reduce per tensor: a batched one packs the tensors together, so one dtype only.
        return tf.nest.map_structure(lambda v: context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.where(first, v, tf.zeros_like(v))), values)

    return strategy.experimental_local_results(strategy.run(chief_only, args=(values,)))[0]


def sync_from_chief(strategy: tf.distribute.Strategy, variables) -> None:
    """Gives every replica's copy of `variables` the value of the chief's first replica.

    For variables that each replica updates on its own, like batch normalisation's moving
    statistics (Keras 3 creates them with aggregation "none"): the trainable weights stay equal
    through the all-reduced gradients, these drift apart with each replica's batches.
    """
    values = from_chief(strategy, [tf.convert_to_tensor(v) for v in variables])
    for variable, value in zip(variables, values):
        variable.assign(value)


class Workers:
    """This process's place among the workers of cfg's run, and what keeps them in step. Built
    first: it sets up the multi-worker runtime, and refuses a batch that the replicas cannot
    share.

    Attributes:
      strategy: the tf.distribute strategy of --strategy.
      distributed: the strategy when it is mirrored or multi-worker, else None (one device).
      chief: whether this process owns MODEL_DIR.
      run: the RunDir where this process writes (MODEL_DIR, or its scratch folder).
      chief_run: MODEL_DIR's RunDir, which the other workers restore from.
    """

    def __init__(self, cfg: config.TrainConfig):
        self.strategy = make_strategy(cfg.strategy)  # first: multi_worker sets up the runtime
        check_batch_size(self.strategy, cfg.batch_size)
        self.distributed = self.strategy if is_distributed(self.strategy) else None
        self.chief = is_chief(self.strategy)
        self.run = RunDir(write_dir(self.strategy, cfg.model_dir))
        self.chief_run = RunDir(cfg.model_dir)

    def scope(self):
        """Where training creates its variables (`variable_scope`)."""
        return variable_scope(self.strategy)

    def from_chief(self, values):
        return from_chief(self.strategy, values)

    def datasets(self, make_dataset, global_batch: int):
        """`make_dataset(batch)` on one device, else one pipeline per worker
        (`per_worker_datasets`)."""
        if self.distributed is None:
            return make_dataset(global_batch)
        return per_worker_datasets(self.strategy, make_dataset, global_batch)

    @contextlib.contextmanager
    def claimed(self, cfg: config.TrainConfig, overwrite: bool):
        """Holds the run folder for the run: the chief locks and claims MODEL_DIR (resume.claim)
        and yields the checkpoint to resume from; another worker locks its scratch folder and
        yields None, once the chief has claimed (a barrier)."""
        with resume.RunLock(self.run.path):
            failpoints.reach("run.locked")
            resume_from = resume.claim(cfg, overwrite) if self.chief else None
            failpoints.reach("run.config_written")
            self.from_chief(0)
            yield resume_from

    def check_same_epoch(self, epochs_done: int) -> None:
        """Refuses to go on when this worker restored another epoch than the chief."""
        chief_epochs = int(self.from_chief(epochs_done))
        if chief_epochs != epochs_done:
            raise config.ConfigError(
                f"--model_dir={self.chief_run.path}: the chief resumes after epoch "
                f"{chief_epochs} but this worker found the checkpoint of epoch {epochs_done}; "
                "put --model_dir on storage that every worker reads")

    def log_devices(self) -> None:
        # A GPU machine whose CUDA libraries TensorFlow cannot load trains on the CPU after a
        # single warning (bench/RESULTS.md §9): say where the run goes.
        gpus, faiss_gpus = tf.config.list_physical_devices("GPU"), faiss.get_num_gpus()
        logging.info("devices: %s; FAISS (k-means, PIC's graph) on %s",
                     f"{len(gpus)} GPU(s) visible to TensorFlow" if gpus
                     else "no GPU visible to TensorFlow, training on the CPU",
                     f"{faiss_gpus} GPU(s)" if faiss_gpus else "the CPU")
