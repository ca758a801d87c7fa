"""``letkit demo``: Late-to-Early Training against standard training, end to end on one CPU.

The pipeline, each stage cached under the cache directory (keyed by content hashes, written atomically so an
interrupted run leaves nothing half-written):

1. **Corpus** -- text files (default: the running Python's own standard library, real text every Python has) or a
   pre-tokenised token file (``.npy``, or raw ``.bin`` of uint16/uint32). Contiguous split: the first 95% of the
   characters (tokens) train, the last 5% validate.
2. **Tokenizer** -- a byte-level BPE trained on the training split, or a given ``tokenizer.json``, or the teacher's.
3. **Teacher** -- a small Llama-style model pretrained on the corpus and saved in Hugging Face layout
   (``letkit.models.save_pretrained``), or any checkpoint :meth:`TeacherFeatureExtractor.from_pretrained` loads.
   With ``cross_tokenizer`` (``--cross-tokenizer``) the teacher may use its own tokenizer: each target window is
   decoded to text, re-tokenized for the teacher and the features aligned by character spans
   (:func:`letkit.token_alignment.tokenize_for_teacher`); ``teacher_vocab_size`` pretrains such a teacher on a smaller BPE.
4. **Two targets**, each with >= 10x the teacher's non-embedding parameters, from the same initialisation, on the
   same batches in the same order, with the same AdamW + warmup/cosine LR schedule for the same number of steps:
   the *baseline* (next-token NLL only) and the *method* (``DemoConfig.method``): *LET*
   (:class:`letkit.LETObjective`), or one of the paper's baselines that distil the teacher's logits
   (:class:`letkit.LogitDistillation`): *SALT* (early in the run) and *RKD* (the whole run), or *LET+SALT*.
5. **Report** -- validation curves, where the method reaches the baseline's final validation loss (linearly
   interpolated between evaluations), step and wall-clock speedups (the teacher's forward passes are part of the
   method's clock; the teacher's pretraining is reported separately), ``metrics.json`` and a PNG of the curves.

Entry points: :func:`run_demo` (what ``letkit demo`` runs) and the stages it is built from, which
``benchmarks/convergence.py`` reuses for its multi-seed study and ablations: :func:`prepare` (data and teacher),
:func:`target_run` (a baseline, LET and/or distillation run), :func:`train_lockstep` (runs side by side on the same
batches) and :func:`compare_runs` (speedups). One module per stage: ``config``, ``cache``, ``corpus``, ``tokens``, ``teacher``,
``train``, ``methods``, ``compare``, ``report``, ``pipeline``.
"""

from letkit.demo.cache import CACHE_FORMAT, default_cache_dir
from letkit.demo.compare import compare_runs, crossing, mean_ci95, seconds_at, t_critical_95
from letkit.demo.config import (
    METHOD_LABELS,
    METHODS,
    PRESETS,
    DemoConfig,
    DemoError,
    KDSettings,
    LETSettings,
    ModelShape,
    TrainSchedule,
    method_settings,
    preset,
)
from letkit.demo.corpus import Corpus, load_corpus, stdlib_corpus_files
from letkit.demo.methods import CrossTokenizerInputs, DistillationTerm, LETAlignment, compare_seed, target_run
from letkit.demo.pipeline import Prepared, check_output_dir, prepare, run_demo
from letkit.demo.report import format_report, plot_curves
from letkit.demo.teacher import (
    TEACHER_INFO_FILE,
    ForwardClock,
    TeacherInfo,
    open_teacher,
    prepare_teacher_data,
    pretrain_teacher,
)
from letkit.demo.tokens import TokenData, check_teacher_reads_data, encode_documents, prepare_data, train_bpe_tokenizer
from letkit.demo.train import (
    AuxiliaryObjective,
    EvalPoint,
    RunResult,
    RunSpec,
    build_model,
    evaluate,
    train_lockstep,
    validation_windows,
)

__all__ = [
    "CACHE_FORMAT",
    "METHODS",
    "METHOD_LABELS",
    "PRESETS",
    "TEACHER_INFO_FILE",
    "AuxiliaryObjective",
    "Corpus",
    "CrossTokenizerInputs",
    "DemoConfig",
    "DemoError",
    "DistillationTerm",
    "EvalPoint",
    "ForwardClock",
    "KDSettings",
    "LETAlignment",
    "LETSettings",
    "ModelShape",
    "Prepared",
    "RunResult",
    "RunSpec",
    "TeacherInfo",
    "TokenData",
    "TrainSchedule",
    "build_model",
    "check_output_dir",
    "check_teacher_reads_data",
    "compare_runs",
    "compare_seed",
    "crossing",
    "default_cache_dir",
    "encode_documents",
    "evaluate",
    "format_report",
    "load_corpus",
    "mean_ci95",
    "method_settings",
    "open_teacher",
    "plot_curves",
    "prepare",
    "prepare_data",
    "prepare_teacher_data",
    "preset",
    "pretrain_teacher",
    "run_demo",
    "seconds_at",
    "stdlib_corpus_files",
    "t_critical_95",
    "target_run",
    "train_bpe_tokenizer",
    "train_lockstep",
    "validation_windows",
]
