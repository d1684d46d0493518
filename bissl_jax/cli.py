"""The ``bissl-jax`` command line (also ``python -m bissl_jax``).

::

  bissl-jax run [--config=FILE[:ARGS]] [--workdir=DIR] [--config.<field>=VALUE ...]
                [--reuse=strict] [--branch_from=PARENT_DIR]
  bissl-jax run --help          # every config field with its value and meaning
  bissl-jax study [--config=FILE] [--workdir=DIR] ...   # the few-label study
  bissl-jax gessl [--config=FILE[:ARGS]] [--workdir=DIR] [--config.<field>=VALUE ...]
  bissl-jax visualize ...       # t-SNE and k-NN of exported backbones
  bissl-jax convert ...         # PyTorch weights <-> converted directories

``run`` is the pipeline of ``python -m experiments.main`` (same flags). Errors a user
can fix (an invalid or unknown config field, a dataset that is not prepared, weights
that do not load, a diverged run) print one short message and exit with status 2;
``--debug`` or ``BISSL_JAX_DEBUG=1`` shows the traceback instead; a diverged run's
message offers a ``--branch_from`` command that continues from its last good
checkpoint with the blamed value changed. Ctrl-C or SIGTERM saves the running stage
and exits with status 130.
"""
import contextlib
import difflib
import errno
import os
import re
import shlex
import sys
from typing import Iterator, List, Optional, Sequence

# The config files import ``configs.common``: make the folder holding ``configs``
# importable wherever the command is started from (a source checkout or an install).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "configs")) and _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bissl_jax.runtime.errors import USER_ERROR_STATUS  # noqa: E402

DEBUG_ENV = "BISSL_JAX_DEBUG"
INTERRUPTED_STATUS = 130
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "digits_simclr.py")
_HELP_ARGS = ("-h", "--help", "--helpfull", "--helpshort", "-?")

_WORKDIR = flags.DEFINE_string("workdir", "./workdir",
                               "Directory for checkpoints, logs and results (resumed if it "
                               "already holds a run).")
# No default here: ml_collections would parse the default file with the command's
# overrides at import, before our own check of their names. The parser below puts
# the default file on the command line instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pipeline config file (default configs/digits_simclr.py).",
    lock_config=True)
_DEBUG = flags.DEFINE_boolean("debug", False,
                              f"Show tracebacks of errors (also: {DEBUG_ENV}=1).")
_REUSE = flags.DEFINE_enum(
    "reuse", None, ["recompute", "strict"],
    "A stage output or checkpoint written with other config values: 'recompute' it and "
    "everything downstream (default, config.reuse) or 'strict': refuse.")
_BRANCH_FROM = flags.DEFINE_string(
    "branch_from", None,
    "A parent run directory: --workdir (new) becomes its branch, resuming the parent's "
    "unfinished stage from its last good checkpoint with the changed config values.")


# The --config spec of this command (for the banner) and its arguments (for advice).
_PARSED = {"config": DEFAULT_CONFIG, "argv": None}


class UsageError(ValueError):
  """A command-line argument is wrong; the message names it and the fix."""


# ----------------------------------------------------------------------------- errors

def debug_requested(argv: Sequence[str] = ()) -> bool:
  """True with ``--debug`` on the command line or ``BISSL_JAX_DEBUG`` set (not 0)."""
  return ("--debug" in argv or "--debug=true" in argv
          or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false"))


def _raised_in_converter(err: BaseException) -> bool:
  """Whether ``err`` was raised by the weight converters (``bissl_jax/convert``)."""
  tb = err.__traceback__
  last = None
  while tb is not None:
    last = tb.tb_frame.f_code.co_filename
    tb = tb.tb_next
  return last is not None and f"bissl_jax{os.sep}convert{os.sep}" in last


def user_error_message(err: BaseException) -> Optional[str]:
  """The message for an error a user can fix, or None for a bug (keep the traceback)."""
  # pylint: disable=g-import-not-at-top  (light imports first: --help stays fast)
  from bissl_jax.config_validation import ConfigError
  from bissl_jax.data.catalogue import DatasetNotFoundError
  from bissl_jax.runtime.errors import LaunchError, NonFiniteError, WorkdirInUseError
  if isinstance(err, (UsageError, app.UsageError, WorkdirInUseError, LaunchError)):
    return f"error: {err}"
  if isinstance(err, ConfigError):
    return f"error: {err}"
  if isinstance(err, DatasetNotFoundError):
    return f"error: missing data.\n{err}"
  if isinstance(err, NonFiniteError):
    return (f"error: training diverged.\n{err}\n" + branch_advice(err))
  full = _disk_full(err)
  if full is not None:
    where = f" while writing {full.filename}" if full.filename else ""
    return (f"error: the disk is full ({os.strerror(full.errno)}{where}). Free some space "
            f"(or give another --workdir), then rerun the same command: it resumes from the "
            f"last checkpoint, and a record cut short is named and recomputed.")
  if isinstance(err, (ValueError, FileNotFoundError, FileExistsError, ImportError)) and (
      _raised_in_converter(err)):
    return (f"error: the weights could not be loaded.\n{err}\nCheck the checkpoint path "
            "fields (pretext.checkpoint, bissl.init_checkpoint, finetune.init_checkpoint, "
            "evaluate.checkpoint) and the model fields (model.arch, "
            "model.width_multiplier, model.cifar_stem).")
  from bissl_jax.runtime import mesh
  return mesh.lost_peer_message(err)  # another process of a multi-process run stopped


def _disk_full(err: BaseException) -> Optional[OSError]:
  """The ENOSPC/EDQUOT ``OSError`` behind ``err`` (itself or a cause), if any."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return err
    err = err.__cause__ or err.__context__
  return None


def _suggested_value(field: str, value) -> Optional[str]:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return None
  if field.endswith("damping"):
    return repr(float(value) * 10 if value else 1.0)
  return f"{float(value) / 10:.3g}"


def branch_advice(err, argv: Optional[Sequence[str]] = None, config=None) -> str:
  """How to continue a diverged run: a branch command with the blamed field changed.

  The command keeps this invocation's arguments, names a new ``--workdir`` and
  ``--branch_from=<the old one>`` (see :mod:`bissl_jax.pipeline.branch`). Without a
  blamed field (a corrupt checkpoint, NaN data) there is no value to change.
  """
  argv = list(argv if argv is not None else (_PARSED["argv"] or sys.argv))
  field = getattr(err, "field", None)
  if field is None:  # an error raised without one: the first field its advice names
    found = re.search(r"config\.([a-z_]+\.[a-z_]+)", str(err))
    field = found.group(1) if found and "to blame" not in str(err) else None
  if field is None:
    return "No learning rate is to blame: fix the named input, then rerun the same command."
  if config is None:
    try:
      config = _CONFIG.value
    except Exception:  # pylint: disable=broad-except  (flags not parsed: a library call)
      config = None
  value = None
  if config is not None:
    from bissl_jax.config_validation import _get  # pylint: disable=g-import-not-at-top
    try:
      value = _get(config, field)
    except (AttributeError, KeyError):
      value = None
  suggestion = getattr(err, "suggestion", None)
  new = (f"{suggestion:.3g}" if suggestion is not None else None) or _suggested_value(
      field, value) or "<new value>"
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")),
                 "./workdir")
  workdir = os.path.abspath(workdir)
  k = 1
  while os.path.exists(f"{workdir}-branch{k}"):
    k += 1
  keep = [a for a in argv[1:] if not a.startswith(
      ("--workdir=", "--branch_from=", f"--config.{field}="))]
  prog = "bissl-jax run" if argv and argv[0].endswith(" run") else (
      "python -m experiments.main")
  # Quoted for a POSIX shell: '--config.seeds=(0,)' must survive being pasted into bash.
  command = " ".join([prog] + [shlex.quote(a) for a in keep + [
      f"--workdir={workdir}-branch{k}", f"--branch_from={workdir}",
      f"--config.{field}={new}"]])
  return ("The last good checkpoint is kept. To continue from it with a changed value, "
          f"branch the run (a new run directory that records its parent):\n  {command}")


@contextlib.contextmanager
def error_boundary(debug: bool = False) -> Iterator[None]:
  """Turns a user-fixable error into its message on stderr and exit status 2.

  With ``debug`` every error propagates with its traceback. Errors that are not the
  user's (bugs) always keep their traceback.
  """
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    message = None if debug else user_error_message(err)
    if message is None:
      raise
    print(message, file=sys.stderr)
    print(f"(Rerun with --debug or {DEBUG_ENV}=1 for the traceback.)", file=sys.stderr,
          flush=True)
    sys.exit(USER_ERROR_STATUS)


# ----------------------------------------------------------------------- config fields

def _config_spec(argv: Sequence[str]) -> str:
  """The ``--config`` value on the command line (default: the digits config)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return DEFAULT_CONFIG


def _find_config_file(spec: str) -> str:
  """``spec`` with its file found relative to the cwd, else to the package root."""
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(_ROOT, path)):
    path = os.path.join(_ROOT, path)
  if not os.path.exists(path):
    raise UsageError(f"--config={spec}: no config file {path!r}. Give a path to one of "
                     f"{os.path.join(_ROOT, 'configs')}/*.py (e.g. "
                     "--config=configs/digits_simclr.py).")
  return path + sep + arg


def _with_config_file(argv: Sequence[str]) -> List[str]:
  """``argv`` with the ``--config`` file path resolved (see ``_find_config_file``)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + _find_config_file(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = _find_config_file(out[i + 1])
  return out


def load_config(spec: str):
  """The ConfigDict of ``--config=<spec>`` (a file path, optionally ``:args``)."""
  values = flags.FlagValues()
  argv = ["bissl-jax", f"--config={_find_config_file(spec)}"]
  # sys_argv: without it ml_collections would apply the command's overrides here.
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=False,
                                  sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise UsageError(f"--config={spec}: {e}") from e
  except Exception as e:  # pylint: disable=broad-except  (the file's own code failed)
    raise UsageError(f"--config={spec}: the config file failed to load: "
                     f"{_where_in_file(e, argv[1][len('--config='):].partition(':')[0])}"
                     f"{type(e).__name__}: {e}. Fix the file (its get_config() must return "
                     f"a ConfigDict).") from e
  return values.config


def _where_in_file(err: BaseException, path: str) -> str:
  """``'<file>, line N: '`` of the deepest frame of ``err`` in ``path`` (or '')."""
  if isinstance(err, SyntaxError) and err.lineno:
    return f"{err.filename or path}, line {err.lineno}: "
  where, tb = "", err.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      where = f"{path}, line {tb.tb_lineno}: "
    tb = tb.tb_next
  return where


def check_overrides(argv: Sequence[str], config) -> None:
  """Raises ConfigError for every ``--config.<field>`` that ``config`` does not have."""
  from bissl_jax.config_validation import check_field_names  # pylint: disable=g-import-not-at-top
  names = [arg.split("=", 1)[0].split("config.", 1)[1] for arg in argv
           if arg.startswith(("--config.", "--noconfig."))]
  check_field_names(config, names, hint="`bissl-jax run --help` lists every field.")


def help_text(spec: str = DEFAULT_CONFIG, prog: str = "bissl-jax run") -> str:
  """Usage, flags and every config field with its value in ``spec`` and its meaning."""
  # pylint: disable=g-import-not-at-top
  from configs import common
  from bissl_jax.config_validation import _choices, config_fields, config_groups
  config = load_config(spec)
  base = config_fields(common.base_config())
  fields = config_fields(config)
  for name in set(base) - set(fields):  # a group the config file filled (bissl_variants)
    if name in config_groups(config):
      node = config
      for part in name.split("."):
        node = node[part]
      fields[name] = node
  choices = _choices()
  gessl = prog.endswith("gessl")
  lines = [
      f"usage: {prog} [--config=FILE[:ARGS]] [--workdir=DIR] "
      "[--config.<field>=VALUE ...] [--debug]",
      "       (same as: " + ("python -m bissl_jax.pipeline.gessl_comparison" if gessl
                           else "python -m experiments.main") + " ...)",
      "",
  ] + ([
      "Pretrains with the pretext task alone and wrapped in GeSSL, then scores both by a",
      "linear probe and few-shot episodes; rerunning with the same --workdir resumes.",
      "See docs/gessl.md.",
  ] if gessl else [
      "Runs the BiSSL pipeline: pretext -> head warm-up -> BiSSL -> fine-tuning -> test,",
      "for the conventional and the BiSSL pipeline; rerunning with the same --workdir",
      "resumes. See docs/pipeline.md.",
  ]) + [
      "",
      "flags:",
      f"  --config=FILE[:ARGS]  config file (default {os.path.relpath(DEFAULT_CONFIG, _ROOT)});"
      " ARGS e.g. downstream=dtd,runlocal",
      "  --workdir=DIR         checkpoints, logs, results (default ./workdir)",
      f"  --debug               show tracebacks (also {DEBUG_ENV}=1)",
      "  --reuse=strict        refuse (instead of recompute) a stage output or checkpoint "
      "written with other config values",
      "  --branch_from=DIR     start --workdir (new) as a branch of the run in DIR: its "
      "unfinished stage resumes from DIR's last good checkpoint with the changed values",
      "  --config.<field>=V    override one field below",
      "",
      f"config fields (value in {spec}; [default: X] where base_config() differs):",
  ]
  width = max(len(n) for n in fields)
  for name in sorted(fields, key=lambda n: (n.count(".") > 0, n)):
    value = fields[name]
    shown = ("{" + ", ".join(value) + "}") if hasattr(value, "items") else repr(value)
    meaning = common.FIELD_HELP.get(name, "(set by this config file)")
    if name in choices:
      meaning += f"; one of {', '.join(choices[name])}"
    default = ""
    if name in base and not hasattr(value, "items") and base[name] != value:
      default = f" [default: {base[name]!r}]"
    lines.append(f"  {name:<{width}}  {shown}{default}  {meaning}")
  return "\n".join(lines) + "\n"


def _last_override_wins(argv: Sequence[str]) -> List[str]:
  """``argv`` with only the last ``--config.<field>=`` of each field.

  ml_collections appends a repeated tuple override to the first one
  (``--config.seeds='(0,)' --config.seeds='(1,)'`` would run seeds 0 and 1); a
  repeated flag must replace, as it does for every other field.
  """
  def field(arg):
    if arg.startswith(("--config.", "--noconfig.")) and "=" in arg:
      return arg.split("=", 1)[0].replace("--noconfig.", "--config.")
    if arg.startswith(("--config.", "--noconfig.")):
      return arg.replace("--noconfig.", "--config.")  # a boolean switch
    return None
  last = {field(a): i for i, a in enumerate(argv) if field(a) is not None}
  return [a for i, a in enumerate(argv) if field(a) is None or last[field(a)] == i]


def _parse_run_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parser with our checks first; prints help for -h/--help."""
  with error_boundary(debug_requested(argv)):
    argv = _last_override_wins(_with_config_file(argv))
    if any(a in _HELP_ARGS for a in argv[1:]):
      prog = argv[0] if argv[0].startswith("bissl-jax ") else "bissl-jax run"
      print(help_text(_config_spec(argv), prog=prog), end="")
      sys.exit(0)
    _PARSED["config"] = _config_spec(argv)
    _PARSED["argv"] = list(argv)
    check_overrides(argv, load_config(_PARSED["config"]))
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
      argv = [argv[0], f"--config={DEFAULT_CONFIG}"] + list(argv[1:])
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      raise UsageError(f"{e}. `bissl-jax run --help` lists every field.") from e


# --------------------------------------------------------------------------- commands

def apply_cpu_kernels(config) -> None:
  """Sets ``config.model.cpu_kernels``'s XLA flag; call before the backend starts."""
  from bissl_jax.runtime import cpu_kernels  # pylint: disable=g-import-not-at-top
  from bissl_jax.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
  kernels = config.model.get("cpu_kernels", "default")
  if kernels not in cpu_kernels.KERNELS:
    raise ConfigError(f"model.cpu_kernels={kernels!r} is not one of {cpu_kernels.KERNELS}; "
                      "use 'fast' (XLA's own convolutions, YNNPACK fusions) or 'default' "
                      "(jaxlib's choice).")
  cpu_kernels.apply(kernels)


def _run_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported after flag parsing so --help stays fast.
  from bissl_jax.runtime import determinism  # pylint: disable=g-import-not-at-top
  from bissl_jax.runtime import mesh as parallel  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import run  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  determinism.pin()  # before the backend starts (bissl_jax/runtime/determinism.py)
  config = _CONFIG.value
  if config is None:  # flags parsed without our parser (the default file)
    config = load_config(DEFAULT_CONFIG)
    config.lock()
  with error_boundary(_DEBUG.value or debug_requested()):
    apply_cpu_kernels(config)
    parallel.initialize_multihost()
    # Cluster pre-emption sends SIGTERM, a user Ctrl-C: both are recorded, never
    # raised where they land (a swallowed exception would lose them); the running or
    # next stage stops after its current step and saves it.
    from bissl_jax.pipeline import stage_loop  # pylint: disable=g-import-not-at-top
    stage_loop.install_stop_handlers()
    try:
      run(config, _WORKDIR.value, announce=_PARSED["config"], reuse=_REUSE.value,
          branch_from=_BRANCH_FROM.value)
    except KeyboardInterrupt:
      # The running stage has saved its last step and said so; no traceback.
      print("Stopped. Rerun the same command (same --workdir) to resume.",
            file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_STATUS)


def run_command(argv: Sequence[str]) -> None:
  """``bissl-jax run``: ``argv[0]`` is the program name, the rest its flags."""
  app.run(_run_main, argv=list(argv), flags_parser=_parse_run_flags)


_COMMANDS = {
    "run": "the pipeline (python -m experiments.main); `bissl-jax run --help` lists "
           "every config field",
    "study": "the few-label study (python -m experiments.study), "
             "configs/study_digits.py by default",
    "gessl": "a pretext task against it + GeSSL, linear probe and few-shot "
             "(configs/digits_gessl.py by default)",
    "visualize": "t-SNE figure and k-NN accuracy of exported backbones "
                 "(python -m bissl_jax.evaluation.visualize_run)",
    "convert": "PyTorch weights <-> converted directories (python -m bissl_jax.convert)",
}


def _usage() -> str:
  rows = "\n".join(f"  {name:<10} {what}" for name, what in _COMMANDS.items())
  return (f"usage: bissl-jax COMMAND [ARGS]  (or python -m bissl_jax COMMAND)\n\n"
          f"commands:\n{rows}\n\n`bissl-jax COMMAND --help` describes each.\n")


def line_buffered_output() -> None:
  """Line-buffers stdout, so that redirected output keeps its order with stderr.

  Redirected to a file or a pipe, stdout is block-buffered: a results line printed
  before an interrupt would land after the interrupt's messages on stderr.
  """
  reconfigure = getattr(sys.stdout, "reconfigure", None)
  if reconfigure is not None:
    reconfigure(line_buffering=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The console script: dispatches to a subcommand; returns the exit status."""
  line_buffered_output()
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in _HELP_ARGS:
    print(_usage(), end="")
    return 0 if len(argv) >= 2 else USER_ERROR_STATUS
  command, rest = argv[1], argv[2:]
  from bissl_jax import more_commands  # pylint: disable=g-import-not-at-top
  runners = {"run": run_command, "gessl": more_commands.gessl_command,
             "study": more_commands.study_command}
  if command in runners:
    prog = os.path.basename(argv[0])
    prog = "bissl-jax" if prog in ("__main__.py", "-c") else prog  # python -m bissl_jax
    runners[command]([f"{prog} {command}"] + rest)
    return 0
  if command in ("visualize", "convert"):
    # pylint: disable=g-import-not-at-top
    if command == "visualize":
      from bissl_jax.evaluation import visualize_run as module
    else:
      from bissl_jax.convert import __main__ as module
    with error_boundary(debug_requested(rest)):
      return module.main([a for a in rest if a != "--debug"])
  close = difflib.get_close_matches(command, list(_COMMANDS), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  print(f"error: unknown command {command!r}.{hint}\n\n{_usage()}", file=sys.stderr, end="")
  return USER_ERROR_STATUS
