"""Before the banner and before anything is written: every input a run needs, at once.

:func:`check` looks at the files only (nothing is loaded, nothing created) and raises
one :class:`InputsError` listing every problem, each once, with its fix:

* the workdir: a directory that can be created and written (not a file, not under a
  file, not on a read-only file system, not without write permission);
* the datasets of the stages that run (image sets: ``bissl_jax.data.check_prepared``;
  GLUE tasks: the files of the source ``data.glue_source`` picks, without asking TFDS);
* the weight files the run reads (``pretext.checkpoint``, or a single stage's input):
  present, and torch installed where they are PyTorch files;
* the tokenizer (``data.tokenizer_dir``: ``vocab.json`` and ``merges.txt``), and the
  original GPT's weights and tokenizer, which a GLUE run on ``model.arch='gpt'`` needs.

Whether weights *fit* the model is checked later (``bissl_jax.pipeline.inputs``), once
the model is built, still before any compute.
"""
import glob
import importlib.util
import os
from typing import List, Optional

from bissl_jax.config_validation import ConfigError, _get
from bissl_jax.data import availability
from bissl_jax.data import detection_sets
from bissl_jax.data import text_sets
from bissl_jax.data.catalogue import DatasetNotFoundError
from bissl_jax.pipeline.inputs import input_fields

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
NEEDS = {  # stage -> (pretext data, downstream data)
    "all": (True, True), "pretext": (True, False), "head_warmup": (False, True),
    "bissl": (True, True), "finetune": (False, True), "evaluate": (False, True)}
_GPT_FILES = ("huggingface-cli download openai-gpt --local-dir GPT_DIR (vocab.json, "
              "merges.txt, pytorch_model.bin or model.safetensors)")


class InputsError(ConfigError):
  """One or more inputs of a run are missing or unusable; the message lists each."""


def check(config, workdir: str, *, branch_from: Optional[str] = None) -> None:
  """Raises :class:`InputsError` naming every unusable input of ``config`` in ``workdir``."""
  problems = workdir_problems(workdir, flag="--workdir")
  if branch_from is not None and not os.path.isdir(branch_from):
    problems.append(f"--branch_from={branch_from}: no such run directory; give the "
                    "--workdir of the run to branch from.")
  problems += data_problems(config)
  problems += weight_problems(config)
  problems += tokenizer_problems(config)
  if problems:
    raise InputsError("The run cannot start (nothing was computed or written):\n"
                      + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------ workdir

def workdir_problems(workdir: str, *, flag: str = "--workdir") -> List[str]:
  """Why ``workdir`` cannot be created or written, as a list of at most one message."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  fix = f"choose another {flag} (a directory you can write)"
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"lies under the file {existing}"
    return [f"{flag}={workdir} {where}: {fix}."]
  if os.statvfs(existing).f_flag & os.ST_RDONLY:
    return [f"{flag}={workdir}: {existing} is on a read-only file system: {fix}."]
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    return [f"{flag}={workdir} {what} (no permission): {fix}, or change the "
            f"permissions of {existing}."]
  return []


# --------------------------------------------------------------------------- data

def data_problems(config) -> List[str]:
  """Every dataset of the run's stages that is not prepared, with its commands."""
  d = config.data
  need_pretext, need_downstream = NEEDS.get(config.stages, (True, True))
  wanted = ([("pretext", d.pretext_dataset)] if need_pretext else []) + (
      [("downstream", d.downstream_dataset)] if need_downstream else [])
  text = [(role, name) for role, name in wanted if text_sets.is_text_dataset(name)]
  boxes = [name for _, name in wanted if detection_sets.is_detection_dataset(name)]
  images = [(role, name) for role, name in wanted
            if (role, name) not in text and name not in boxes]
  problems = [p for role, name in text for p in _glue_problems(name, d)]
  problems += [p for name in dict.fromkeys(boxes)
               for p in detection_sets.preparation_problems(name, d.data_dir)]
  try:
    availability.check_prepared(images, d.data_dir)
  except DatasetNotFoundError as e:
    problems.append(str(e).replace("\n", "\n    "))
  return problems


def _glue_problems(name: str, d) -> List[str]:
  """A GLUE task's files for ``data.glue_source``, looked for without TFDS (no warnings)."""
  from bissl_jax.data import glue  # pylint: disable=g-import-not-at-top
  if name in text_sets.PRETEXT_SETS:  # the offline corpus ships with Python
    return []
  spec = text_sets.task_spec(name)
  if spec.glue_task is None:  # the offline downstream text set
    return []
  gspec = glue.get_glue_spec(spec.glue_task)
  source = glue.resolve_source(gspec, d.glue_source, d.data_dir)
  if source in ("jsonl", "hf"):
    found = (d.data_dir and (os.path.isfile(glue._jsonl_file(gspec, "train", d.data_dir))  # pylint: disable=protected-access
                             if source == "jsonl"
                             else glue._hf_files(gspec, "train", d.data_dir)))  # pylint: disable=protected-access
    where = d.data_dir or "config.data.data_dir (unset)"
  else:
    root = availability.tfds_data_dir(d.data_dir)
    found = "://" in root or glob.glob(os.path.join(root, "glue", gspec.name, "*",
                                                    "dataset_info.json"))
    where = os.path.join(root, "glue", gspec.name) + (
        "" if d.data_dir else " (config.data.data_dir unset: TFDS's default folder)")
  if found:
    return []
  message = str(glue._not_found(gspec, d.data_dir, f"looked for {source} files in {where}"))  # pylint: disable=protected-access
  return [message.replace("\n", "\n    ") + "\n    then set --config.data.data_dir to that folder."]


# ------------------------------------------------------------------- weights, tokenizer

def weight_problems(config) -> List[str]:
  """Every weight path the run reads that is missing, or needs torch where it is absent."""
  problems = []
  for field in input_fields(config):
    path = _get(config, field)
    if not path:
      continue
    files = [p.strip() for p in str(path).split(",") if p.strip()]  # backbone.pth,head.pth
    for missing in [p for p in files if not os.path.exists(p)]:
      problems.append(f"config.{field}={path}: no such file or directory {missing}; point "
                      "it at the weights (a stage output, a converted directory, or .pth "
                      "files: docs/pretrained.md)"
                      + (", or unset it to pretrain." if field == "pretext.checkpoint" else "."))
    torch_files = [p for p in files if p.endswith(TORCH_SUFFIXES) and os.path.exists(p)]
    if torch_files and not _torch_installed():
      problems.append(f"config.{field}={path} holds PyTorch files and torch is not "
                      "installed: pip install -e '.[torch]', or convert them once where "
                      f"torch is (python -m bissl_jax.convert --from-torch "
                      f"{' '.join(torch_files)} --arch ARCH --out DIR) and point the field "
                      "at DIR.")
  if (config.model.arch == "gpt" and config.stages in ("all", "head_warmup")
      and _is_glue(config) and not config.pretext.checkpoint):
    problems.append("config.pretext.checkpoint is unset: the original GPT's GLUE runs start "
                    "from its weights (--config.pretext.checkpoint=GPT_DIR/pytorch_model.bin "
                    f"or model.safetensors); get them once with {_GPT_FILES}.")
  return problems


def tokenizer_problems(config) -> List[str]:
  """``data.tokenizer_dir`` must hold the BPE files; the original GPT needs them for GLUE."""
  directory = config.data.get("tokenizer_dir")
  if directory:
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      return [f"config.data.tokenizer_dir={directory}: {' and '.join(missing)} not found; "
              f"point it at the GPT files ({_GPT_FILES})."]
    return []
  if config.model.arch == "gpt" and _is_glue(config):
    return ["config.data.tokenizer_dir is unset: the original GPT reads GLUE through its "
            "own BPE (--config.data.tokenizer_dir=GPT_DIR with vocab.json and merges.txt); "
            f"get them once with {_GPT_FILES}."]
  return []


def _is_glue(config) -> bool:
  name = config.data.downstream_dataset
  return text_sets.is_text_dataset(name) and text_sets.task_spec(name).glue_task is not None


def _torch_installed() -> bool:
  try:
    return importlib.util.find_spec("torch") is not None
  except ImportError:
    return False
