"""Keeping the model libraries' chatter out of every capworks process's log, the same way in the
one-shot commands and in a worker.

Loading OFA imports ModelScope, transformers and fairseq; some of their modules configure
logging when imported (fairseq's speech tasks call `logging.basicConfig`, ModelScope sets its
loggers to INFO), and transformers warns about OFA's generation methods on every model built. A
worker that loaded a model therefore printed scores of lines before "ready". Both modes call
`quiet_libraries` once those imports are done; our own loggers keep the level asked for.
"""

from __future__ import annotations

import logging
import sys
import warnings

# Loggers of libraries whose INFO and WARNING lines say nothing an operator can act on.
LIBRARY_LOGGERS = (
    "modelscope",
    "modelscope_hub",
    "transformers",
    "fairseq",
    "botocore",
    "boto3",
    "urllib3",
    "s3transfer",
    "PIL",
    "filelock",
    "datasets",
    "torch",
    "alembic",  # "Running upgrade ..." on every process that opens a fresh database
)


def quiet_libraries(root_level: int | str, *, import_transformers: bool = False) -> None:
    """Put the root logger back at `root_level` (a library may have lowered it) and the model
    libraries' loggers at ERROR. transformers resets its own logger's level when first used, so
    its verbosity is set through its API: when it is loaded, or, with `import_transformers`
    (a process about to load a model), after importing it (~4 s) here."""
    logging.getLogger().setLevel(root_level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if import_transformers:
        try:
            import transformers  # noqa: F401 - its logging module is configured below
        except ImportError:
            pass
    transformers_module = sys.modules.get("transformers")
    if transformers_module is not None:
        transformers_module.logging.set_verbosity_error()
    # Warnings the libraries raise while a model is built (deprecations inside them).
    for module in ("transformers", "modelscope", "fairseq", "torch"):
        warnings.filterwarnings("ignore", module=module)
