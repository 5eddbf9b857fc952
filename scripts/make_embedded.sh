#!/bin/sh
# Regenerates the embedded default dataset in assets/: the first N (default 2000)
# Fashion-MNIST training images and labels, as gzipped IDX files, plus the licence.
#
# Source: Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist),
# which installs the upstream files of https://github.com/zalandoresearch/fashion-mnist
# under /usr/share/datasets/fashion-mnist/. Needs python3 (standard library only).
# The output is byte-for-byte reproducible (gzip header without name or time).
#
# Usage: scripts/make_embedded.sh [N] [SOURCE_DIR]
set -eu

N="${1:-2000}"
SRC="${2:-/usr/share/datasets/fashion-mnist}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/assets"

for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz; do
    if [ ! -f "$SRC/$f" ]; then
        echo "$SRC/$f: missing (apt-get install dataset-fashion-mnist)" >&2
        exit 1
    fi
done
mkdir -p "$OUT"

python3 - "$N" "$SRC" "$OUT" <<'PY'
import gzip, io, os, struct, sys

n, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def read_idx(path, magic, ndims):
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">I", data[:4])
    if got != magic:
        sys.exit(f"{path}: bad magic 0x{got:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(">" + "I" * ndims, data[4:4 + 4 * ndims])
    body = data[4 + 4 * ndims:]
    item = 1
    for d in dims[1:]:
        item *= d
    if len(body) != dims[0] * item:
        sys.exit(f"{path}: {len(body)} data bytes, header says {dims[0] * item}")
    return dims, item, body

def write_idx_gz(path, magic, dims, body):
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + body
    buf = io.BytesIO()
    # mtime=0 and no file name: reproducible bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(raw)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)

dims, item, images = read_idx(os.path.join(src, "train-images-idx3-ubyte.gz"), 0x803, 3)
ldims, _, labels = read_idx(os.path.join(src, "train-labels-idx1-ubyte.gz"), 0x801, 1)
if n > dims[0] or ldims[0] != dims[0]:
    sys.exit(f"asked for {n} samples; the source has {dims[0]} images and {ldims[0]} labels")

write_idx_gz(os.path.join(out, f"fashion-mnist-{n}-images-idx3-ubyte.gz"), 0x803,
             (n,) + tuple(dims[1:]), images[:n * item])
write_idx_gz(os.path.join(out, f"fashion-mnist-{n}-labels-idx1-ubyte.gz"), 0x801,
             (n,), labels[:n])
print(f"wrote {n} images ({dims[1]}x{dims[2]}) and labels to {out}")
PY

cat > "$OUT/LICENSE-fashion-mnist.txt" <<'LIC'
The files fashion-mnist-*-idx*-ubyte.gz in this directory are the first samples of the
Fashion-MNIST training set (images and labels, unchanged, re-packed as gzipped IDX files by
scripts/make_embedded.sh).

Source: https://github.com/zalandoresearch/fashion-mnist
(taken from Debian's package dataset-fashion-mnist,
/usr/share/datasets/fashion-mnist/train-{images-idx3,labels-idx1}-ubyte.gz)

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
LIC
echo "wrote $OUT/LICENSE-fashion-mnist.txt"
