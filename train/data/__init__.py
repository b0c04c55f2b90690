"""Training data, one module per concern:

- tokens.py: token files (NAME.bin + NAME.json), the format every token source reads;
- text.py: text files as documents (globs, the document separator);
- corpus.py: the built-in byte-level corpus;
- sources.py: data.source as datasets, and what the data decides (vocab_size=auto, the source of a path);
- split.py: the validation split, independent of seed and world size;
- stream.py: the global sample stream, a pure function of (seed, step), and the loader.

The names below are the package's interface; the modules import each other directly.
"""

from train.data.corpus import build_corpus
from train.data.sources import build_dataset, data_tokenizer, describe, resolve_data
from train.data.split import validation_set
from train.data.stream import build_loader
from train.data.tokens import BYTE_VOCAB, read_token_file, write_token_file

__all__ = [
    "BYTE_VOCAB",
    "build_corpus",
    "build_dataset",
    "build_loader",
    "data_tokenizer",
    "describe",
    "read_token_file",
    "resolve_data",
    "validation_set",
    "write_token_file",
]
