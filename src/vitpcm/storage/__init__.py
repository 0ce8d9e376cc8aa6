"""One way to read and write local paths, ``s3://`` objects (MinIO, AWS) and ``http(s)://`` URLs.

``s3://`` objects are managed through the MinIO client (:mod:`vitpcm.storage.s3`, which
also names the settings: ``S3_ENDPOINT`` with its scheme, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``); TensorFlow reads and writes ``s3://`` itself
(``tf.data`` streaming TFRecords, checkpoints, TensorBoard) through tensorflow-io, which code
that hands it an ``s3://`` URI registers first with :func:`ensure_s3_filesystem`.
``http(s)://`` is read-only (weights, archives).

Two facts shape this package:

* S3 has no rename, so :func:`atomic_dir` (:mod:`vitpcm.storage.atomic`) writes under a
  temporary prefix and copies into place, the commit marker (``dataset.json``,
  ``metrics.json``...) last: a reader that requires the marker never sees a half-written
  folder as whole.
* A process that registered tensorflow-io's ``s3://`` aborts at interpreter exit
  (tensorflow/io#2039), so entry points leave through :func:`exit_process`.
"""

from __future__ import annotations

from vitpcm.storage import s3 as s3
from vitpcm.storage.atomic import atomic_dir as atomic_dir
from vitpcm.storage.atomic import remove_stale_temporaries as remove_stale_temporaries
from vitpcm.storage.core import ensure_s3_filesystem as ensure_s3_filesystem
from vitpcm.storage.core import entry_state as entry_state
from vitpcm.storage.core import exists as exists
from vitpcm.storage.core import exit_process as exit_process
from vitpcm.storage.core import glob as glob
from vitpcm.storage.core import is_http as is_http
from vitpcm.storage.core import is_remote as is_remote
from vitpcm.storage.core import is_s3 as is_s3
from vitpcm.storage.core import join as join
from vitpcm.storage.core import list_files as list_files
from vitpcm.storage.core import listdir as listdir
from vitpcm.storage.core import local_path as local_path
from vitpcm.storage.core import makedirs as makedirs
from vitpcm.storage.core import read_bytes as read_bytes
from vitpcm.storage.core import remove_files as remove_files
from vitpcm.storage.core import remove_tree as remove_tree
from vitpcm.storage.core import s3_used as s3_used
from vitpcm.storage.core import write_bytes as write_bytes
from vitpcm.storage.core import write_file as write_file
from vitpcm.storage.s3 import check_s3_config as check_s3_config
from vitpcm.storage.s3 import s3_environment as s3_environment
