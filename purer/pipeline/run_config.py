"""The run's configuration: one dataclass section per stage, and the error a user can fix.

``recipes/configs/*.yaml`` and ``key=value`` overrides set any field (see
:func:`purer.yaml_config.load_config`); a misspelt key is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..baselines import METHODS as BASELINE_METHODS
from ..calibrate import CALIBRATIONS, Calibrator, ICFILConfig
from ..distill import DistillConfig
from ..data.sources import RECIPE_IMAGE_SIZE
from ..evaluate import TuningGrid
from ..inversion import InversionConfig, SwitchConfig
from ..meta import E3BMConfig, MAMLConfig, MatchingConfig, MetaTrainConfig, MTLConfig, RelationConfig
from ..meta.base import TASK_BATCHING
from ..meta.task_adaptive import MEMBERS as TASK_ADAPTIVE
from ..zoo.pretrain import PretrainConfig

#: ``meta.learner`` names: MAML, its task-adaptive family (purer.meta.task_adaptive), ANIL, ProtoNet, Matching
#: and Relation Networks, MTL and E3BM (on the base ``meta.e3bm.base``).
LEARNERS = ("maml", *TASK_ADAPTIVE, "anil", "protonet", "matching", "relation", "mtl", "e3bm")
#: Learners without a way-sized head: their tasks may have any way at test time.
ANY_WAY = ("protonet", "matching", "relation")
#: Learners the test-time calibrations (ICFIL, support CE) cannot follow, and why.
NOT_CALIBRATABLE = {
    "matching": "its prediction is attention over the support set, not a linear head on one network",
    "relation": "its prediction is a relation module's score, not a linear head on one network",
    "e3bm": "its prediction is an ensemble of the inner loop's epochs, not one network",
    "metal": "its inner loop reads the task's query images, which a calibration's adaptation does not get",
    "tao": "its inner loop (MeTAL's loss) reads the task's query images, which a calibration's adaptation does "
           "not get",
}
#: Learners that freeze a pre-trained encoder (MTL, E3BM on MTL), and the initialisations that give one.
PRETRAINED_INITS = ("zoo-student", "avg-teachers", "best-teacher")
# The rows a default run compares its meta-learner with (fine-tuning and ProtoNet rows: see
# purer.baselines.METHODS, e.g. eval.baselines=[...] in a config).
DEFAULT_BASELINES = ("nc-pixels", "nc-best-teacher", "nc-all-teachers", "maml-random", "maml-avg-teachers",
                     "maml-real")
INITS = ("random", "avg-teachers", "zoo-student", "best-teacher")
FP16_REFUSED = ("mixed_precision fp16 is not supported: the bank's gradients pass back through the teachers' "
                "float16 activations with no loss scaling; use bf16 (float32's range, as fast on recent GPUs) or no")
PRECISIONS = ("no", "bf16")


@dataclass
class DataConfig:
    """The real data: meta-val for selection, meta-test for the table, meta-train only for baselines.

    Attributes:
        dataset: a name of :func:`purer.data.load_split` (``glyphs`` is built in), or several
            joined by ``+`` (``glyphs+icons``, the MH scenario: one learner, selected on the
            mean of the datasets' meta-val accuracies and meta-tested on each, beside each
            one's own baselines).
        root: where the dataset lies (``glyphs``: the cache directory); for several datasets
            a mapping ``{dataset: root}`` (a dataset it does not name: its default place).
        image_size: the side every image is resized to; Conv4 at 32 px ends in
            2x2x32 = 128 features, at 28 px in only 32 (METHOD.md).
    """

    dataset: str = "glyphs"
    root: str | dict | None = None
    image_size: int = RECIPE_IMAGE_SIZE

    def __post_init__(self):
        names = self.dataset.split("+")
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"dataset must be a name or distinct names joined by '+', got {self.dataset!r}")
        if isinstance(self.root, dict) and set(self.root) - set(names):
            raise ValueError(f"root names datasets {sorted(set(self.root) - set(names))} that dataset does not hold")
        if isinstance(self.root, str) and len(names) > 1:
            raise ValueError("with several datasets, give root as a mapping {dataset: root}")

    def each(self) -> list["DataConfig"]:
        """One config per dataset (``[self]`` for one dataset)."""
        names = self.dataset.split("+")
        if len(names) == 1:
            return [self]
        roots = self.root or {}
        return [DataConfig(name, roots.get(name), self.image_size) for name in names]


@dataclass
class ZooConfig:
    """The model zoo: an existing directory, or one pre-trained on first use.

    Attributes:
        path: the zoo directory (default: ``model_zoo/zoos/<dataset>-<arch>-<models>x<classes>-<subsets>-<size>px``,
            with ``-<epochs>ep`` / ``-seed<seed>`` when those differ from the defaults).
        build_if_missing: pre-train the zoo from the fields below when ``path`` holds none (or
            finish one they started); a zoo holding other models is used as it is.
        spec: a zoo spec file (``model_zoo/specs/*.yaml``, :class:`purer.zoo.pretrain.PretrainConfig`
            keys, e.g. a zoo of several datasets' ``parts``) to build the zoo from, instead of the
            fields below; the default ``path`` is then ``model_zoo/zoos/<spec file name>``.
        num_models, classes_per_model, arch, subsets, epochs, seed: the pre-training
            recipe (see :class:`purer.zoo.pretrain.PretrainConfig`); teachers learn
            classes of the meta-train split only.
        merge_shared_classes: teachers whose ``class_ids`` name the same class share one
            bank class (METHOD.md part 1: a class is (model, local label) unless the zoo
            says two models share a class id), so with ``subsets: random`` a pseudo task
            never holds one class under two labels.  Set false for a zoo whose class ids
            are per-model labels (e.g. ``0..4`` of unrelated datasets).
    """

    path: str | None = None
    build_if_missing: bool = True
    spec: str | None = None
    num_models: int = 12
    classes_per_model: int = 5
    arch: str = "conv4"
    subsets: str = "disjoint"
    epochs: int = PretrainConfig.epochs
    seed: int = 0
    merge_shared_classes: bool = True


@dataclass
class MetaConfig:
    """The meta-learner and its training on pseudo episodes.

    Attributes:
        learner: one of :data:`LEARNERS` (default ``l2f``, chosen on meta-val over the canon:
            ``benchmarks/results/learners_glyphs.md``): ``maml``; its task-adaptive members ``l2f`` (initialisation),
            ``alfa`` (update rule), ``metal`` (inner loss) and ``tao`` (all three; see
            :mod:`purer.meta.task_adaptive`), which take the inner loop of ``maml``; ``anil``;
            ``protonet``; ``matching`` (Matching Networks, section ``matching``); ``relation``
            (Relation Networks, section ``relation``); ``mtl`` (meta-transfer learning, section
            ``mtl``; its frozen encoder is the initialisation's, so ``init`` must be ``best-teacher``,
            ``zoo-student`` or ``avg-teachers``); ``e3bm`` (an ensemble over the inner loop's epochs, on the base
            ``e3bm.base``: ``maml`` or ``mtl``).
        arch, arch_args: its network (any registered architecture).
        init: ``random``, ``avg-teachers`` (the release's initialisation; needs a
            same-architecture zoo), ``zoo-student`` (the zoo distilled into a fresh ``arch``
            on the run's bank before meta-training; see :func:`purer.student.zoo_student`) or
            ``best-teacher`` (the teacher of ``arch`` whose features are best on the run's meta-val tasks, the
            one ``nc-best-teacher`` uses, with a fresh head; see :func:`purer.pipeline.build.best_start_teacher`;
            a zoo with no teacher of ``arch`` on the learner's input gives random initialisation instead, printed,
            except to MTL, which needs a pre-trained encoder).
        zoo_student_steps: iterations of the ``zoo-student`` pre-phase (one inversion step
            and one student step each).
        way, shot, query: the pseudo tasks it trains on (the release uses 15 queries;
            the default 5 makes an iteration about 2.5 times cheaper on a CPU).
        images_per_class: P, bank images per class (default ``shot + query``, as the release).
        maml: inner loop (MAML, ANIL, the task-adaptive members, E3BM on MAML).
        matching, relation, mtl, e3bm: the settings of those learners (the papers' defaults); ``mtl`` is also
            the base of ``e3bm`` with ``e3bm.base: mtl``.
        hard_tasks: MTL's hard-task meta-batch, for any learner: this many tasks of a meta-batch are
            re-sampled from the classes earlier tasks failed on, whenever ``way`` of them are pooled
            (:mod:`purer.meta.hard_tasks`); 0: off.
        train: iterations, meta-batch, outer lr and its ``schedule`` (constant by default, or cosine-annealed),
            ``val_every`` (meta-val selection), ``average`` (meta-val scores, and the run keeps, a moving
            average of the weights; off by default) and ``patience`` (stop once that many meta-val scores in a
            row set no new best: ``iterations`` becomes a ceiling). Default: a ceiling of 3,000 iterations,
            meta-val every 250 on ``val_tasks`` tasks, patience 2.
        val_tasks: size of the fixed meta-val task list used for selection.
        task_batching: how a meta-batch's (and an evaluation chunk's) tasks go through
            the learner: ``vmap`` together, ``loop`` one by one, ``auto`` (``vmap`` on a
            GPU, ``loop`` on a CPU); see :attr:`purer.meta.MetaLearner.task_batching`.
    """

    learner: str = "l2f"
    arch: str = "conv4"
    arch_args: dict = field(default_factory=dict)
    init: str = "random"
    zoo_student_steps: int = 300
    way: int = 5
    shot: int = 1
    query: int = 5
    images_per_class: int | None = None
    # Inner lr 0.1, not the release's 0.01: on glyph meta-val (5-way 1-shot, 600 ECI iterations) 0.1 reached
    # 82% at 500 iterations where 0.01 reached 67% at 400; METHOD.md's prototype also adapts best at 0.1.
    maml: MAMLConfig = field(default_factory=lambda: MAMLConfig(inner_lr=0.1))
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)
    mtl: MTLConfig = field(default_factory=MTLConfig)
    e3bm: E3BMConfig = field(default_factory=E3BMConfig)
    hard_tasks: int = 0
    # Early stopping under a ceiling (chosen across zoos on meta-val, benchmarks/results/selection_cross_zoo.md): a
    # small zoo's meta-val peaks near 1,000 iterations and then falls, a large one's still climbs at 3,000.
    train: MetaTrainConfig = field(default_factory=lambda: MetaTrainConfig(iterations=3000, val_every=250, patience=2))
    val_tasks: int = 100
    task_batching: str = "auto"

    @property
    def freezes_encoder(self) -> bool:
        """MTL (and E3BM on MTL) freeze the initialisation's encoder, so they need a pre-trained one."""
        return self.learner == "mtl" or (self.learner == "e3bm" and self.e3bm.base == "mtl")

    def __post_init__(self):
        if self.zoo_student_steps < 1:
            raise ValueError(f"zoo_student_steps must be >= 1, got {self.zoo_student_steps}")
        if not 0 <= self.hard_tasks <= self.train.meta_batch:
            raise ValueError(f"hard_tasks must lie in 0..meta.train.meta_batch={self.train.meta_batch}, got "
                             f"{self.hard_tasks}")
        if self.task_batching not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {self.task_batching!r}")


@dataclass
class EvalConfig:
    """Meta-test protocol: the same seeded task list for every row.

    Attributes:
        way, shots, query, tasks, seed: the meta-test task lists (one per shot).
        val_tasks: meta-val tasks for choosing test-time settings.
        grid: the shared grid of test-time inner lr and steps.
        calibrations: test-time calibrations after (or instead of) the inner loop, one row
            each (``purer+<name>``): ``icfil`` and its control ``support-ce`` (the same steps
            as cross-entropy on the real support), and ``simpleshot`` (no inner loop: the
            nearest normalised centroid of the meta-learned features);
            :data:`purer.calibrate.CALIBRATIONS`.  The one best on meta-val (or none) is
            marked ``"selected": true`` and saved with the meta-learner; ``[]``: none.
        calibration_grid: per calibration, its settings searched on meta-val (keys as in
            :func:`purer.calibrate.with_settings`, e.g. ``{icfil: {calibration_lr: [1e-4, 1e-3]}}``);
            a calibration it does not name runs as configured (ICFIL: the ``icfil`` section;
            support CE: ICFIL's calibration steps and lr).
        baselines: rows of :data:`purer.baselines.METHODS` to run (cached by config).
        baseline_train_iterations: real-data meta-training of the upper-bound rows.
    """

    way: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    tasks: int = 600
    seed: int = 0
    val_tasks: int = 30
    grid: TuningGrid = field(default_factory=lambda: TuningGrid(steps=(1, 10)))
    calibrations: list[str] = field(default_factory=lambda: ["icfil", "support-ce", "simpleshot"])
    calibration_grid: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    baseline_train_iterations: int = 300


@dataclass
class RunConfig:
    """Everything :func:`run` needs; ``recipes/configs/*.yaml`` set any of it.

    Attributes:
        output_dir: where results, pictures, logs and checkpoints go.
        seed: training seed (bank, meta-learner initialisation, pseudo tasks, teacher sampling).
        checkpoint_every: meta-iterations between checkpoints (:mod:`purer.pipeline.checkpoints`).
        picture_every: meta-iterations between PNG grids of a pseudo episode.
        cache_dir: cached baseline rows (keyed by everything they depend on).
        threads: torch threads per process (``None``: torch's default). One is fastest for
            these small networks; use processes (``accelerate launch --num_processes``) for more cores.
        cpu: run on the CPU even where a GPU is present (as ``accelerate launch --cpu``);
            otherwise the Accelerator's device (CUDA when present).
        mixed_precision: ``no`` or ``bf16`` for the teachers' forward passes (inversion,
            zoo distillation and the feature baselines); ``None``: what ``accelerate launch
            --mixed_precision`` says.  The bank, its optimizer and the meta-learner stay
            in float32.  ``fp16`` is refused: the bank's gradients pass back through the
            teachers' activations, and float16's range (no loss scaling here) would underflow them.
        deterministic: deterministic GPU kernels (``torch.use_deterministic_algorithms``),
            so a GPU run repeats itself exactly, at some cost in speed.  purer's own path
            avoids every operation torch cannot run deterministically; a network of your own
            that uses one (e.g. ``F.grid_sample``) gets torch's warning naming it, and
            the run is then not bit-repeatable.  Runs on different devices draw the same
            tasks, teachers and augmentations either way.
        log_every: meta-iterations between TensorBoard points and progress-bar updates;
            the numbers in between stay on the device (no synchronisation per step).
    """

    data: DataConfig = field(default_factory=DataConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    switch: SwitchConfig = field(default_factory=lambda: SwitchConfig(warmup=200))
    meta: MetaConfig = field(default_factory=MetaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # A cheaper ICFIL than its library defaults: it runs on every meta-test task of both shots.
    icfil: ICFILConfig = field(default_factory=lambda: ICFILConfig(inversion_steps=5, calibration_steps=5))
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/purer-glyphs"
    seed: int = 0
    checkpoint_every: int = 250
    picture_every: int = 500
    cache_dir: str = "runs/.cache"
    threads: int | None = 1
    cpu: bool = False
    mixed_precision: str | None = None
    deterministic: bool = False
    log_every: int = 10

    def test_rows(self) -> list[str]:
        """The meta-test rows, ``"none"`` (the plain learner) and each calibration of ``eval.calibrations``.

        At a way its head cannot take (``eval.way`` other than ``meta.way``, for a learner not in :data:`ANY_WAY`)
        only the calibrations that read the learner's features alone (:attr:`Calibrator.adapts` false:
        SimpleShot) can classify, so they are the rows: the learner meta-trained on 5-way pseudo tasks is
        meta-tested at 20-way through its features."""
        rows = ["none", *self.eval.calibrations]
        if self.meta.learner in ANY_WAY or self.meta.way == self.eval.way:
            return rows
        return [name for name in self.eval.calibrations if not Calibrator.members[name].adapts]

    def __post_init__(self):
        if self.meta.learner not in LEARNERS:
            raise ValueError(f"meta.learner must be one of {LEARNERS}, got {self.meta.learner!r}")
        if self.meta.init not in INITS:
            raise ValueError(f"meta.init must be one of {INITS}, got {self.meta.init!r}")
        if set(self.eval.calibrations) - set(CALIBRATIONS):
            raise ValueError(f"unknown eval.calibrations {sorted(set(self.eval.calibrations) - set(CALIBRATIONS))}; "
                             f"choose from {sorted(CALIBRATIONS)}")
        if set(self.eval.calibration_grid) - set(self.eval.calibrations):
            raise ValueError(f"eval.calibration_grid names {sorted(set(self.eval.calibration_grid) - set(self.eval.calibrations))}"
                             f", which eval.calibrations does not run; key it by a calibration of {self.eval.calibrations}")
        unknown = set(self.eval.baselines) - set(BASELINE_METHODS)
        if unknown:
            raise ValueError(f"unknown eval.baselines {sorted(unknown)}; choose from {list(BASELINE_METHODS)}")
        if not self.test_rows():
            raise ValueError(f"a {self.meta.learner} meta-learner's head has meta.way={self.meta.way} outputs, so at "
                             f"eval.way={self.eval.way} only a calibration that reads its features alone can classify: "
                             f"add simpleshot to eval.calibrations, or set eval.way={self.meta.way}")
        if self.eval.calibrations and self.meta.learner in NOT_CALIBRATABLE:
            raise ValueError(f"eval.calibrations {self.eval.calibrations} cannot follow a {self.meta.learner} "
                             f"learner ({NOT_CALIBRATABLE[self.meta.learner]}); set eval.calibrations=[]")
        if self.meta.freezes_encoder and self.meta.init not in PRETRAINED_INITS:
            raise ValueError(f"MTL freezes a pre-trained encoder, and meta.init={self.meta.init} gives none; set "
                             f"meta.init=zoo-student (the zoo distilled into one network), avg-teachers or best-teacher")
        if min(self.eval.query, self.meta.query) < 1:
            raise ValueError(f"eval.query and meta.query must be >= 1 query per class, got {self.eval.query} and "
                             f"{self.meta.query}")
        if min(self.eval.tasks, self.eval.val_tasks, self.meta.val_tasks) < 1 or not self.eval.shots:
            raise ValueError("eval.tasks, eval.val_tasks and meta.val_tasks must be >= 1, and eval.shots non-empty")
        if self.checkpoint_every < 1 or self.picture_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every, picture_every and log_every must be >= 1")
        if self.mixed_precision == "fp16":
            raise ValueError(FP16_REFUSED)
        if self.mixed_precision not in (None, *PRECISIONS):
            raise ValueError(f"mixed_precision must be one of {PRECISIONS} (or unset), got {self.mixed_precision!r}")
        if self.inversion.seed != InversionConfig.seed:
            # The run's seed drives the inversion (see meta_train_eci); a second seed would be ignored.
            raise ValueError(f"inversion.seed is set by the run's seed; use seed={self.inversion.seed} instead")


class RunError(RuntimeError):
    """A problem with the run's inputs (dataset, zoo, task sizes) that the user can fix."""
