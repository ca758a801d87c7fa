"""Deprecated alias of :mod:`letkit.token_alignment`, where the cross-tokenizer code now lives; removed in the
next release."""

import warnings

from letkit.token_alignment import *  # noqa: F403
from letkit.token_alignment import __all__  # noqa: F401
from letkit.token_alignment.encoding import _check_tokenizer  # noqa: F401  (imported from here before the move)

warnings.warn("letkit.tokenization is deprecated and will be removed: import from letkit.token_alignment (or letkit)",
              DeprecationWarning, stacklevel=2)
