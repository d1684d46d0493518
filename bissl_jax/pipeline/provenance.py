"""Provenance of finished artifacts: which config values (and inputs) made each one.

Every stage output (``<stage>/output``), its in-stage checkpoints and the records
derived from them (``evaluation.json``, the search record) carry a
:class:`Provenance`: the config fields that determine the stage's result, the
digests of its inputs (the upstream stage outputs or given checkpoint files) and,
for a branched run, where it branched from. Its :attr:`~Provenance.digest` is the
input digest of every stage downstream, so a change anywhere upstream changes the
fingerprint of everything after it.

A rerun reuses an artifact only when the provenance it was written with equals the
one the current config asks for (:func:`reusable`). Otherwise it names the
differing fields and, with ``config.reuse='recompute'`` (the default), sets the
stale artifact aside (``<stage dir>/superseded/<time>/``, never deleted) and
recomputes the stage, and so everything downstream of it; with
``config.reuse='strict'`` (``bissl-jax run --reuse=strict``) it refuses with
:class:`~bissl_jax.config_validation.ConfigError` instead.
"""
import hashlib
import json
import os
import shutil
import time
from typing import Any, Iterable, Mapping, NamedTuple, Optional


from bissl_jax.config_validation import ConfigError
from bissl_jax.config_validation import config_fields as flatten
from bissl_jax.convert import stage_output
from bissl_jax.runtime import mesh as parallel

RECORD_KEY = "provenance"  # where an export's meta (or a JSON record) keeps it
# Data fields no result depends on: where the files are and how batches are fed (the
# batches are the same for any worker count or prefetch depth).
FEED_FIELDS = ("data.data_dir", "data.loader_workers", "data.device_prefetch")
# Fields added after workdirs were written, with the value that computes what the
# records without them computed: left out of a record at that value, so an old
# workdir's artifacts stay reusable and its checkpoints keep resuming.
ADDED_LATER = {"model.backbone_ends_at": "res5", "bissl.preconditioner": "none",
               "bissl.upper_method": "implicit", "bissl.penalty_sigma": 1.0,
               "bissl.penalty_inner_steps": 5, "bissl.penalty_lr": 0.01,
               "bissl.penalty_momentum": 0.9}


def normalise(value: Any) -> Any:
  """``value`` as JSON would give it back (tuples → lists, keys sorted, odd types → str)."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_fields(config, groups: Iterable[str], exclude: Iterable[str] = ()) -> dict:
  """``{'<group>.<field>': value}`` of every field of ``groups`` not in ``exclude``.

  ``exclude`` holds dotted names (``'pretext.checkpoint'``). Nested groups are
  flattened (``'bissl_variants.mfac.solver'``).
  """
  exclude = set(exclude)
  out = {}
  for group in groups:
    node = config.get(group) if hasattr(config, "get") else config[group]
    if node is None:
      continue
    for name, value in flatten(node, prefix=group + ".").items():
      if name in exclude or (name in ADDED_LATER and value == ADDED_LATER[name]):
        continue
      out[name] = value
  return out


class Provenance(NamedTuple):
  """What determines one artifact.

  Attributes:
    fields: ``{dotted config name (or a stage argument such as 'seed'): value}``.
    inputs: ``{input name: digest}`` of the artifacts the stage read.
  """
  fields: Mapping[str, Any]
  inputs: Mapping[str, str] = {}

  def record(self) -> dict:
    """The JSON record stored with the artifact (fields, inputs and the digest)."""
    body = {"fields": normalise(dict(self.fields)), "inputs": normalise(dict(self.inputs))}
    return dict(body, digest=_digest(body))

  @property
  def digest(self) -> str:
    return self.record()["digest"]

  def fingerprint(self) -> dict:
    """The flat ``{name: value}`` of the in-stage checkpoints (``Stage.fingerprint``)."""
    out = dict(self.fields)
    out.update({f"input.{k}": v for k, v in self.inputs.items()})
    return out


def _digest(body: Mapping) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def differences(wanted: Mapping, saved: Optional[Mapping]) -> list:
  """The names whose values differ between two provenance records (sorted).

  Config fields are named as they are (``'bissl.lam'``), inputs as
  ``'input <name>'``; a record without provenance gives ``['(no provenance)']``.
  """
  if not saved or "fields" not in saved:
    return ["(no provenance recorded)"]
  out = []
  for part, label in (("fields", "{}"), ("inputs", "input {}")):
    a, b = dict(wanted.get(part, {})), dict(saved.get(part, {}))
    out += sorted(label.format(k) for k in set(a) | set(b) if a.get(k) != b.get(k))
  return out


def digest_of(path: str) -> str:
  """The digest of an input artifact at ``path``.

  A stage output with provenance gives its provenance digest (so a stage that reads
  it fingerprints what made it, not its bytes); another stage output its meta
  record; a file (a PyTorch ``.pth``) or a directory (converted weights) the SHA-256
  of its bytes.
  """
  path = os.path.abspath(path)
  if stage_output.is_export(path):
    _, meta = stage_output.load_export_meta(path)
    if RECORD_KEY in meta:
      return meta[RECORD_KEY]["digest"]
    return _digest(normalise(meta))
  digest = hashlib.sha256()
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
  if not files:
    raise FileNotFoundError(f"{path}: no such file or directory.")
  for name in files:
    digest.update(os.path.relpath(name, path).encode())
    with open(name, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return "sha256:" + digest.hexdigest()


def with_lineage(prov: Provenance, stage_dir: str) -> Provenance:
  """``prov`` plus the branch point of the stage in ``stage_dir``, if it was branched."""
  from bissl_jax.pipeline import branch  # pylint: disable=g-import-not-at-top
  point = branch.lineage(stage_dir)
  if point is None:
    return prov
  return Provenance(dict(prov.fields, branch=point), prov.inputs)


def set_aside(stage_dir: str, paths: Iterable[str]) -> Optional[str]:
  """Moves the existing ``paths`` into ``<stage_dir>/superseded/<time>/``; returns it."""
  existing = [p for p in paths if os.path.exists(p)]
  if not existing:
    return None
  target = os.path.join(stage_dir, "superseded", time.strftime("%Y%m%d-%H%M%S")
                        + f"-{int(time.time() * 1000) % 1000:03d}")
  # Several processes see the same files: all have looked before process 0 moves them.
  parallel.sync_processes("set_aside: looked")
  if parallel.is_writer():
    os.makedirs(target, exist_ok=True)
    for p in existing:
      shutil.move(p, os.path.join(target, os.path.basename(p)))
  parallel.sync_processes("set_aside: moved")
  return target


def stale_message(name: str, what: str, changed: list) -> str:
  return (f"[{name}] {what} was made with other values of {changed}")


def reusable(out_dir: str, wanted: Provenance, *, mode: str, name: str,
             also: Iterable[str] = ()) -> bool:
  """Whether the stage output ``out_dir`` may be reused for ``wanted``.

  True when it exists and was written with the same provenance. When it exists
  with another one: ``mode='strict'`` raises ConfigError naming the differing
  fields; ``'recompute'`` sets it aside, with the stage's checkpoints and the
  ``also`` paths (records derived from it), says so and returns False.

  Args:
    out_dir: ``<stage dir>/output``.
    wanted: the provenance the current config asks for.
    mode: ``config.reuse``.
    name: label of the messages (``'bissl/seed0'``).
    also: further paths that belong to this output (e.g. ``evaluation.json``).
  """
  stage_dir = os.path.dirname(os.path.abspath(out_dir))
  if not stage_output.is_export(out_dir):
    return False
  wanted = with_lineage(wanted, stage_dir)
  try:
    _, meta = stage_output.load_export_meta(out_dir)
    changed = differences(wanted.record(), meta.get(RECORD_KEY))
    if not changed:
      stage_output.load_export(out_dir)  # reads back intact (checksum) and finite
      return True
  except Exception as err:  # pylint: disable=broad-except  (any unreadable output)
    _set_aside_damaged(name, out_dir, err, [out_dir] + list(also))
    return False
  _refuse_or_set_aside(
      stale_message(name, f"the output in {out_dir}", changed), mode,
      fixes="those values, use a fresh --workdir, or drop --reuse=strict to recompute "
            "this stage and everything after it",
      directory=stage_dir, paths=[out_dir, os.path.join(stage_dir, "ckpt")] + list(also),
      then="recomputing this stage and everything downstream of it (the old output is kept")
  return False


def _set_aside_damaged(name: str, out_dir: str, err: BaseException, paths: list) -> None:
  """A stage output that does not read back: named, moved aside; the stage recomputes it.

  Its checkpoints stay: a finished stage's last checkpoint re-exports it at once.
  """
  first = (str(err).splitlines() or [""])[0][:200]
  moved = set_aside(os.path.dirname(os.path.abspath(out_dir)), paths)
  print(f"[{name}] the output in {out_dir} is damaged ({type(err).__name__}: {first}); "
        f"moved it to {moved} and recomputing this stage.", flush=True)


def reusable_record(path: str, wanted: Provenance, *, mode: str, name: str) -> bool:
  """:func:`reusable` for a JSON record that stores its provenance under ``provenance``."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    try:
      record = json.load(f)
    except ValueError:
      record = {}
  changed = differences(wanted.record(), record.get(RECORD_KEY))
  if not changed:
    return True
  _refuse_or_set_aside(
      stale_message(name, f"the record {path}", changed), mode,
      fixes="those values or use a fresh --workdir", directory=os.path.dirname(
          os.path.abspath(path)), paths=[path], then="recomputing it (the old one is kept")
  return False


def _refuse_or_set_aside(message: str, mode: str, *, fixes: str, directory: str,
                         paths: list, then: str) -> None:
  """A stale artifact: ``ConfigError`` under ``--reuse=strict``, else moved aside, said."""
  if mode == "strict":
    raise ConfigError(f"{message}; --reuse=strict refuses to reuse or replace it. Restore "
                      f"{fixes}.")
  moved = set_aside(directory, paths)
  print(f"{message}: {then} in {moved}).", flush=True)
