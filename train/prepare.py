"""Turn text files into a token file for data.source=files.

    python -m train.prepare --input 'corpus/*.txt' --output data/mycorpus.bin

Byte-level: each file's bytes are its tokens, followed by a NUL separator, written as uint16
into data/mycorpus.bin with its sidecar data/mycorpus.json (the format is described in
train/data.py, so a file from your own tokenizer can be written the same way). Train on it
with ARGS="data.source=files data.path=data/mycorpus.bin".
"""

from __future__ import annotations

import argparse
import sys

from train.data import BYTE_VOCAB, DataError, document_chunks, expand_globs, sidecar_path, write_token_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="GLOB",
        help="text files or globs (** recurses); quote globs, repeat or list several",
    )
    parser.add_argument(
        "--output", required=True, metavar="PATH.bin", help="the token file to write; its .json sidecar goes next to it"
    )
    args = parser.parse_args(argv)
    try:
        if not args.output.endswith(".bin"):
            raise DataError(f"--output {args.output!r} must end in .bin, e.g. data/mycorpus.bin")
        files = expand_globs(args.input, "--input", "check the path and quote globs")
        info = write_token_file(args.output, document_chunks(files), BYTE_VOCAB, meta={"files": len(files)})
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read or write {exc.filename} ({exc.strerror}); check the paths", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output} and {sidecar_path(args.output)}: {info['count']:,} {info['dtype']} tokens "
        f'from {len(files)} files; train with ARGS="data.source=files data.path={args.output}"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
