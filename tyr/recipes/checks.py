"""Every recipe's settings, checked before anything is loaded or written.

:func:`validate` takes a recipe's composed config and raises :class:`SettingsError` (one line naming
the setting) for a value the run would fail on later: an impossible sparsity, a search that cannot
run, a data source that cannot be read, a checkpoint folder without weights, an export of a folder
that is no pipeline run. It also checks the run directory's stage records
(:mod:`tyr.recipes.stages`): a rerun with other settings is refused unless ``redo`` says to redo the
stage that changed.

:class:`Checks` is a Hydra callback (``hydra.callbacks`` in conf/hydra/default.yaml): in a single run
it validates in ``on_run_start``, *before* Hydra creates the run directory or rewrites
``.hydra/config.yaml``, so a refused command leaves no stray directory and the previous run's record
untouched. A failed accepted rerun restores the previous ``.hydra/`` files (:func:`restore_record`).
In a multirun each job is validated by :func:`tyr.recipes.common.recorded`, so the sweep records the
failure and goes on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tyr.artifacts import SettingsError
from tyr.recipes.formats import check_formats, folder_model_type, model_type_of

if TYPE_CHECKING:
    from tyr.recovery.trainer import RecoverySettings

COMPARE = ("dense", "uniform", "uniform_reprune", "owl", "searched_other")
EEA = ("none", "expectation", "uniform", "path")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise SettingsError(msg)


def _num(value, name: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r} is not a number") from None


def check_sparsity(cfg: DictConfig) -> None:
    s = _num(cfg.target_sparsity, "target_sparsity")
    _need(0.0 < s < 1.0, f"target_sparsity={cfg.target_sparsity} must be a fraction strictly between 0 and 1")


def check_model(cfg: DictConfig) -> None:
    """The model's source, as far as it can be checked without loading: a local folder must hold
    config.json, weights and a tokenizer; ``model=hf_folder`` needs its path."""
    from tyr.models import check_folder

    src = cfg.model.get("source")
    if src is None:
        return
    if "path" in src.keys() and OmegaConf.is_missing(src, "path"):
        raise SettingsError(f"model {cfg.model.name!r} reads a local folder: give model.source.path=/path/to/checkpoint_folder")
    path = src.get("path")
    if path and (Path(str(path)).expanduser().exists() or not src.get("hub_id")):
        try:
            check_folder(str(cfg.model.name), str(path))
        except FileNotFoundError as e:
            raise SettingsError(str(e)) from None
    _need(
        str(cfg.model.get("dtype", "float32")) in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype} must be float32, bfloat16 or float16",
    )


def check_token_set(node: DictConfig, where: str) -> None:
    from tyr.data import DataSourceError, TokenSetSpec, check_spec

    try:
        spec = TokenSetSpec(**OmegaConf.to_container(node, resolve=True))
    except TypeError as e:
        raise SettingsError(f"{where}: {e}") from None
    try:
        check_spec(spec, where)
    except DataSourceError as e:
        raise SettingsError(str(e)) from None


def check_eval(cfg: DictConfig) -> None:
    from tyr.data import DataSourceError, check_source
    from tyr.tasks import TaskDataMissingError, UnknownTaskError, check_tasks

    e = cfg.eval
    _need(_num(e.seq_len, "eval.seq_len", int) >= 2, f"eval.seq_len={e.seq_len} must be at least 2")
    _need(int(e.ppl_windows) == -1 or int(e.ppl_windows) >= 1, f"eval.ppl_windows={e.ppl_windows} must be >= 1 (or -1: all)")
    _need(e.limit is None or int(e.limit) >= 1, f"eval.limit={e.limit} must be >= 1 (or null: the full split)")
    _need(int(e.batch_size) >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    try:  # tyr's local task files, or lm-eval's registered tasks whose data can be loaded
        check_tasks(list(e.tasks))
    except (UnknownTaskError, TaskDataMissingError) as err:
        raise SettingsError(f"eval.tasks: {err}") from None
    for src in e.perplexity:
        try:
            check_source(str(src))
        except DataSourceError as err:
            raise SettingsError(f"eval.perplexity: {err}") from None


def _pruner(cfg: DictConfig):
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.pruner)
    except Exception as e:  # noqa: BLE001 - a bad pruner setting is the user's
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SettingsError(f"pruner={cfg.pruner.get('name')}: {msg}") from None


def check_data(cfg: DictConfig, search: bool) -> None:
    """Every text a stage reads: readable, and no evaluation text (test splits, the general dev set)."""
    from tyr.data import DataSourceError, refuse_eval_text

    roles = ["calibration"] + (["search"] if search else []) + (["gradient"] if _pruner(cfg).needs_gradients else [])
    for role in roles:
        try:
            refuse_eval_text(str(cfg.data[role].source), f"data.{role}.source")
        except DataSourceError as e:
            raise SettingsError(str(e)) from None
        check_token_set(cfg.data[role], f"data.{role}")


def check_search(cfg: DictConfig, tokens: bool = True) -> None:
    """The search settings; with ``tokens``, also that every stage fits in the search token set."""
    from tyr.search.settings import BUDGETS, CHOOSE_FORMS, STARTS

    s = cfg.search
    n = int(s.n_levels)
    _need(n >= 3 and n % 2 == 1, f"search.n_levels={n} must be odd and at least 3 (a centre level and one step either side)")
    _need(len(s.intervals) > 0, "search.intervals=[] must hold at least one level interval")
    for x in s.intervals:
        _need(0.0 < float(x) < 1.0, f"search.intervals: {x} must be a fraction between 0 and 1")
    _need(int(s.generations) >= 1, f"search.generations={s.generations} must be at least 1")
    _need(int(s.offspring) >= 1, f"search.offspring={s.offspring} must be at least 1")
    _need(int(s.max_flips) >= 1, f"search.max_flips={s.max_flips} must be at least 1")
    _need(int(s.min_heads) >= 1 and int(s.min_channels) >= 1, "search.min_heads and search.min_channels must be >= 1")
    _need(
        s.prescreen_keep is None or int(s.prescreen_keep) >= 1, f"search.prescreen_keep={s.prescreen_keep} must be >= 1 or null"
    )
    _need(int(s.surrogate_check) >= 0, f"search.surrogate_check={s.surrogate_check} must be >= 0")
    _need(int(s.topk) >= 1, f"search.topk={s.topk} must be at least 1")
    _need(str(s.eea) in EEA, f"search.eea={s.eea} must be one of {', '.join(EEA)}")
    _need(
        "choose_form" not in s or str(s.choose_form) in CHOOSE_FORMS,
        f"search.choose_form={s.get('choose_form')} must be one of {', '.join(CHOOSE_FORMS)}",
    )
    _need("start" not in s or str(s.start) in STARTS, f"search.start={s.get('start')} must be one of {', '.join(STARTS)}")
    _need("budget" not in s or str(s.budget) in BUDGETS, f"search.budget={s.get('budget')} must be one of {', '.join(BUDGETS)}")
    _need(
        s.get("final_eea") is None or str(s.final_eea) in EEA,
        f"search.final_eea={s.get('final_eea')} must be null or one of {', '.join(EEA)}",
    )
    hold = float(s.get("holdout", 0.0))
    _need(0.0 <= hold < 1.0, f"search.holdout={hold} must be a fraction in [0, 1)")
    stages = [tuple(int(v) for v in st) for st in s.stages]
    _need(len(stages) > 0, "search.stages=[] must hold at least one [tokens, survivors] stage")
    _need(all(t >= 1 and k >= 1 for t, k in stages), f"search.stages={stages}: tokens and survivors must be >= 1")
    _need(stages[-1][1] == 1, f"search.stages: the last stage must keep 1 survivor, not {stages[-1][1]}")
    d = cfg.data.search
    N, T = int(d.num_sequences), int(d.seq_len)
    if N > 0 and tokens:
        n_hold = max(1, int(round(hold * N))) if hold > 0 else 0
        _need(n_hold < N, f"search.holdout={hold} leaves no search sequences out of data.search.num_sequences={N}")
        avail = (N - n_hold) * T
        big = [t for t, _ in stages if t > avail]
        _need(
            not big,
            f"search.stages: {big[0] if big else 0} tokens per candidate, but the search sees only {avail} "
            f"tokens ({N - n_hold} sequences x {T}; data.search.num_sequences={N}, search.holdout={hold})",
        )


def check_supernet(cfg: DictConfig) -> None:
    s = cfg.supernet
    _need(int(s.n_levels) >= 1 and int(s.n_levels) % 2 == 1, f"supernet.n_levels={s.n_levels} must be odd and positive")
    _need(0.0 < float(s.interval) < 1.0, f"supernet.interval={s.interval} must be a fraction between 0 and 1")
    _need(str(s.eea) in EEA, f"supernet.eea={s.eea} must be one of {', '.join(EEA)}")
    _need(not (s.eea == "path" and s.path and not Path(str(s.path)).exists()), f"supernet.path={s.path} does not exist")


def check_build_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A build directory already holding layers made with other settings is refused before loading."""
    from tyr.artifacts import CorruptArtifactError, describe_diff, read_json_checked
    from tyr.recipes.stages import model_identity

    manifest = Path(run_dir) / "supernet" / "manifest.json"
    if not manifest.exists():
        return
    try:
        m = read_json_checked(manifest)
    except CorruptArtifactError as e:
        raise SettingsError(f"{e}; delete {manifest.parent} to rebuild it") from None
    if not m.get("layers"):
        return
    needs_grad = _pruner(cfg).needs_gradients
    new = {
        "model": model_identity(cfg),
        "eea": str(cfg.supernet.eea),
        "config": {
            "pruner": OmegaConf.to_container(cfg.pruner, resolve=True),
            "calibration": OmegaConf.to_container(cfg.data.calibration, resolve=True),
            "gradient": OmegaConf.to_container(cfg.data.gradient, resolve=True) if needs_grad else None,
            "target_sparsity": float(cfg.target_sparsity),
        },
    }
    old = {"model": m.get("model"), "eea": m.get("eea"), "config": {k: (m.get("config") or {}).get(k) for k in new["config"]}}
    if describe_diff(old, new) != "no setting differs":
        raise SettingsError(
            f"{manifest}: built with another configuration ({describe_diff(old, new)}); "
            "use another directory or delete it to rebuild"
        )


def check_export(cfg: DictConfig) -> None:
    if cfg.get("folder"):  # an exported folder, written as a GGUF
        folder = Path(str(cfg.folder))
        _need(OmegaConf.is_missing(cfg, "run"), "give run=<pipeline run> or folder=<exported folder>, not both")
        _need((folder / "config.json").is_file(), f"folder={cfg.folder} holds no config.json (give an exported folder)")
        return check_formats(OmegaConf.merge(cfg, {"export_formats": ["hf", "gguf"]}), folder_model_type(folder))
    _need(not OmegaConf.is_missing(cfg, "run"), "missing setting run: give run=<pipeline run dir> (or folder=<exported folder>)")
    run = Path(str(cfg.run))
    _need(run.is_dir(), f"run={cfg.run}: no such directory (give a pipeline run directory)")
    for f in ("allocation.json", ".hydra/config.yaml"):
        _need((run / f).exists(), f"run={cfg.run} is not a finished pipeline run: it holds no {f}")
    _need(str(cfg.layout) in ("padded", "index"), f"layout={cfg.layout} must be padded or index")
    from tyr.artifacts import CorruptArtifactError, read_json_checked

    try:
        read_json_checked(run / "allocation.json")
        OmegaConf.load(run / ".hydra" / "config.yaml")
    except CorruptArtifactError as e:
        raise SettingsError(f"{e}; rerun the pipeline with redo=search to remake it") from None
    except Exception as e:  # noqa: BLE001 - a garbled YAML record
        raise SettingsError(f"{run / '.hydra' / 'config.yaml'} cannot be read ({type(e).__name__})") from None
    check_formats(cfg, model_type_of(OmegaConf.load(run / ".hydra" / "config.yaml").model))


def check_plan(cfg: DictConfig) -> None:
    check_sparsity(cfg)
    _need(cfg.model.get("arch") is not None, f"model={cfg.model.name} has no arch: block in conf/model; the planner needs it")
    for key in ("calib_tokens", "grad_tokens", "seq_len"):
        _need(cfg.get(key) is None or int(cfg[key]) >= 1, f"{key}={cfg.get(key)} must be >= 1 (or null)")
    for key in ("tflops", "cpu_tflops"):
        _need(float(cfg[key]) > 0, f"{key}={cfg[key]} must be positive")
    for part in ("calibration", "search", "gradient"):
        d = cfg.data[part]
        _need(int(d.seq_len) >= 2 and int(d.num_sequences) >= 1, f"data.{part}: seq_len and num_sequences must be positive")
    check_search(cfg, tokens=False)  # a plan may size a search for data it does not name
    check_supernet(cfg)


def validate(cfg: DictConfig, job: str, run_dir: Path | None = None) -> None:
    """All checks of recipe ``job`` (pipeline, build, prune, evaluate, export, plan)."""
    if job == "export":
        return check_export(cfg)
    if job == "plan":
        return check_plan(cfg)
    if "batch_size" in cfg:
        _need(int(cfg.batch_size) >= 1, f"batch_size={cfg.batch_size} must be >= 1")
    check_model(cfg)
    if job in ("pipeline", "build", "prune"):
        check_sparsity(cfg)
        check_data(cfg, search=job == "pipeline")
    if "eval" in cfg:
        check_eval(cfg)
    if "export_formats" in cfg and cfg.get("export"):
        check_formats(cfg, model_type_of(cfg.model))
    if job == "build":
        check_supernet(cfg)
        if run_dir is not None:
            check_build_dir(cfg, run_dir)
    if job == "pipeline":
        unknown = [c for c in cfg.compare if c not in COMPARE]
        _need(not unknown, f"compare: unknown {unknown}; known: {', '.join(COMPARE)}")
        check_search(cfg)
        check_finalists(cfg)
        if run_dir is not None:
            from tyr.recipes.stages import check_run

            check_run(cfg, run_dir)


def settings_from(r: DictConfig) -> RecoverySettings:
    """The typed settings of a ``recover`` config node (``data``: the ``sources`` as ``{source, weight}``)."""
    from tyr.recovery.trainer import RecoverySettings
    from tyr.settings import from_config

    options = OmegaConf.to_container(r, resolve=True)
    options["sources"] = [(d["source"], d["weight"]) for d in options.pop("data")]
    return from_config(RecoverySettings, options, "recover")


def used_text(data: DictConfig | None, eval_cfg: DictConfig) -> dict[str, str]:
    """The text a run calibrated, searched and evaluates on: role -> source."""
    used = {f"evaluation ({s})": str(s) for s in eval_cfg.perplexity}
    for role in ("calibration", "search", "gradient"):
        if data is not None and data.get(role) is not None:
            used[role] = str(data[role].source)
    return used


def recovery_settings(cfg: DictConfig, data: DictConfig | None = None) -> RecoverySettings | None:
    """The typed ``cfg.recover`` (None when it is null), validated: a bad setting, evaluation text, or text that
    overlaps calibration / search / evaluation text raises :class:`RecoveryError` or ``ValueError``."""
    if cfg.get("recover") is None:
        return None
    from tyr.recovery.data import check_disjoint

    s = settings_from(cfg.recover)
    s.validate()
    check_disjoint([src for src, _ in s.sources], used_text(data if data is not None else cfg.get("data"), cfg.eval))
    return s


def check_finalists(cfg: DictConfig) -> None:
    """The recovery stage's settings and text, and the finalists' (which need a recovery: their short one is
    the pipeline's recovery with ``finalists.tokens``), before the run directory is made."""
    import dataclasses

    from tyr.finalists import FinalistSettings

    try:
        recovery = recovery_settings(cfg)
        f = cfg.get("finalists")
        if f is not None and len(f.alphas) > 0:
            FinalistSettings(tuple(float(a) for a in f.alphas), int(f.tokens)).validate()
            _need(recovery is not None, "finalists=recovery gives each finalist a short recovery: it needs recover=lora or full")
            dataclasses.replace(recovery, tokens=int(f.tokens)).validate()
    except ValueError as e:
        raise SettingsError(str(e).replace("recover.tokens", "finalists.tokens")) from None


def check_output_dir(path: Path, what: str = "run directory") -> None:
    """The directory ``path`` exists or can be made; otherwise one line naming what is in the way (a link
    to a missing directory, a file, a place without write permission). Makes the directory, as Hydra is
    about to: called only once the settings are accepted."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise SettingsError(
                f"{what} {path}: {p} is a link to {os.readlink(p)}, which does not exist; remove the link or create its target"
            )
        if p.exists():
            _need(p.is_dir(), f"{what} {path}: {p} is a file, not a directory; move it away or set paths.output_dir=...")
            _need(
                p == path or os.access(p, os.W_OK | os.X_OK),
                f"{what} {path}: no permission to write in {p}; set paths.output_dir=... to a writable place",
            )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SettingsError(
            f"{what} {path} cannot be made: {e.strerror or e} ({e.filename}); set paths.output_dir=... to a writable place"
        ) from None


# --- the Hydra callback --------------------------------------------------------------------------

_previous_record: dict[Path, bytes] = {}


def restore_record() -> None:
    """Put back the ``.hydra/`` files of the run before this failed attempt (see :class:`Checks`)."""
    for path, data in _previous_record.items():
        path.write_bytes(data)


def fail(msg: str) -> None:
    print(f"tyr: {msg}", file=sys.stderr)
    sys.exit(2)


class Checks(Callback):
    """Validate a single run before Hydra creates its directory or rewrites ``.hydra/``."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        job = str(config.hydra.job.name)
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            run_dir = Path(str(config.hydra.run.dir))
        except Exception:  # noqa: BLE001 - a run dir built from a missing value (e.g. export's run=???)
            run_dir = None
        try:
            validate(task, job, run_dir)
        except Exception as e:  # noqa: BLE001 - every refusal here is one line
            from omegaconf.errors import MissingMandatoryValue

            if isinstance(e, MissingMandatoryValue):
                fail(f"missing setting {str(e).splitlines()[0].split('key:')[-1].strip() or e}: give it on the command line")
            from tyr.recipes.errors import user_errors, user_message

            fail(user_message(e) if isinstance(e, (ValueError, *user_errors())) else f"{type(e).__name__}: {e}")
        if run_dir is not None:
            try:
                check_output_dir(run_dir)
            except SettingsError as e:
                fail(str(e))
        if run_dir is not None and config.hydra.output_subdir is not None:
            hydra_dir = run_dir / str(config.hydra.output_subdir)
            _previous_record.update({p: p.read_bytes() for p in hydra_dir.glob("*.yaml")} if hydra_dir.is_dir() else {})

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The sweep's directory, before Hydra makes it (each job is validated by ``recorded``)."""
        try:
            check_output_dir(Path(str(config.hydra.sweep.dir)), "sweep directory")
        except SettingsError as e:
            fail(str(e))
