"""Libraries' warnings and log messages kept out of ft's output, so that ft's own words come first and alone.

Importing the training stack prints things a user of ft cannot act on: on a CPU machine torch logs deprecation
warnings for torchao's enums (torch's pytree), and bitsandbytes logs that it found no `kernels` package for its CPU
4-bit kernels; a user reads the first lines, and these would be them. ft's own messages (errors, its warnings such as
a large image's) are printed through rich, never through Python's warnings or logging, so hiding those for libraries
hides none of ft's. `ft --verbose` leaves everything as the libraries set it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Libraries that set up their own loggers when imported, and so read their level from the environment: transformers,
# datasets and huggingface_hub (a verbosity name) and torch (TORCH_LOGS; "-torch" is ERROR for all of torch's logs).
# A user's own settings win.
LIBRARY_LOG_SETTINGS = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "TORCH_LOGS": "-torch",
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ warnings, such as DDP's on find_unused_parameters
}


def quiet_libraries() -> None:
    """Hide Python warnings (unless the user chose a filter with -W or PYTHONWARNINGS) and every log record below
    ERROR; call it before the libraries are imported (their own logger setup reads the environment then)."""
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # loggers left at their default level (bitsandbytes, torchao, peft)
    for name, value in LIBRARY_LOG_SETTINGS.items():
        os.environ.setdefault(name, value)
