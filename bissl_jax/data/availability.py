"""Whether the datasets of a run are prepared locally, checked without TFDS.

:func:`check_prepared` looks at the files only (a TFDS dataset is prepared when
``<data_dir>/<builder>/<version>/dataset_info.json`` exists; FGVC-Aircraft when its
``variants.txt`` is found), so a missing dataset is reported without TFDS's own log
lines, and every missing dataset of a run is named in one message, each with the
command that prepares it.
"""
import glob
import os
from typing import Optional, Sequence, Tuple

from bissl_jax.data import folder
from bissl_jax.data.catalogue import DatasetNotFoundError, DatasetSpec, get_spec


def tfds_data_dir(data_dir: Optional[str]) -> str:
  """The directory TFDS reads: ``data_dir``, else ``$TFDS_DATA_DIR``, else its default."""
  return (data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def is_prepared(spec: DatasetSpec, data_dir: Optional[str]) -> bool:
  """Whether ``spec`` can be read from ``data_dir`` (looks at the files only)."""
  if spec.source in ("sklearn", "imagefolder"):  # imagefolder: checked by get_spec
    return True
  if spec.source == "folder":
    try:
      folder.find_fgvc_root(data_dir or ".")
    except DatasetNotFoundError:
      return False
    return True
  root = tfds_data_dir(data_dir)
  if "://" in root:  # a bucket: leave the check to TFDS
    return True
  return bool(glob.glob(os.path.join(root, spec.tfds_name, "*", "dataset_info.json")))


def preparation_steps(spec: DatasetSpec, data_dir: Optional[str]) -> str:
  """Where ``spec`` was looked for and the commands that prepare it (indented lines)."""
  if spec.source == "folder":
    where = data_dir or "."
    return (f"    looked for {os.path.join(where, folder.ARCHIVE_DIR, 'data', 'variants.txt')}"
            f"\n    fetch fgvc-aircraft-2013b.tar.gz from "
            f"https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it into "
            f"{where}")
  root = tfds_data_dir(data_dir)
  lines = [f"    looked for {os.path.join(root, spec.tfds_name)}/<version>/"]
  if spec.manual_download:
    lines.append("    download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                 f"image-net.org into {os.path.join(root, 'downloads', 'manual')}/, then")
  lines.append(f"    tfds build {spec.tfds_name} --data_dir={root} --file_format=array_record")
  return "\n".join(lines)


def check_prepared(datasets: Sequence[Tuple[str, str]], data_dir: Optional[str]) -> None:
  """Raises one DatasetNotFoundError naming every dataset that is not prepared.

  Args:
    datasets: ``(role, name)`` pairs, e.g. ``[('pretext', 'imagenet2012'),
      ('downstream', 'dtd')]``; a dataset listed twice is reported once.
    data_dir: ``config.data.data_dir``.
  """
  from bissl_jax.data import image_folder, tfds_by_name  # pylint: disable=g-import-not-at-top
  missing, seen = [], set()
  for role, name in datasets:
    if image_folder.is_folder_name(name):  # your own images: the layout is the check
      err = image_folder.problem(image_folder.root_of(name))
      if err and name not in seen:
        missing.append(f"  - {name!r} ({role}): {err}.\n    {image_folder.LAYOUT_HINT}")
      seen.add(name)
      continue
    if tfds_by_name.is_tfds_name(name):  # any TFDS name: prepared, with image and label
      try:
        spec = tfds_by_name.spec_of(name, data_dir)
      except DatasetNotFoundError as e:
        if name not in seen:
          missing.append(f"  - ({role}) " + str(e).replace("\n", "\n    "))
        seen.add(name)
        continue
    else:
      spec = get_spec(name)
    if spec.name in seen:
      continue
    seen.add(spec.name)
    if not is_prepared(spec, data_dir):
      missing.append(f"  - {spec.name!r} ({role}"
                     f"{f', TFDS builder {spec.tfds_name!r}' if spec.tfds_name else ''}):\n"
                     + preparation_steps(spec, data_dir))
  if missing:
    count = "1 dataset is" if len(missing) == 1 else f"{len(missing)} datasets are"
    raise DatasetNotFoundError(
        f"{count} not prepared (nothing is downloaded at run time):\n"
        + "\n".join(missing)
        + "\nPrepare them once (on a machine with internet access, and TensorFlow if a "
          "builder needs it), then point config.data.data_dir at that folder "
          f"(now: {data_dir or 'None, the TFDS default'}).")
