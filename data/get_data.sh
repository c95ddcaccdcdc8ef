#!/usr/bin/env bash
# Puts tiny Shakespeare at data/tinyshakespeare.txt: copied from ../shared/data when that
# exists beside the repository, otherwise downloaded from its public home (char-rnn).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/tinyshakespeare.txt"
shared="$here/../../shared/data/tinyshakespeare.txt"
url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
md5=6fb458f1232090904fb40fe944165e91
if [ -f "$dest" ] && [ "$(md5sum < "$dest" | cut -d' ' -f1)" = "$md5" ]; then exit 0; fi
if [ -f "$shared" ]; then
  cp "$shared" "$dest"
else
  echo "get_data: downloading $url"
  curl -fsSL "$url" -o "$dest.tmp" || wget -q "$url" -O "$dest.tmp"
  mv "$dest.tmp" "$dest"
fi
got=$(md5sum < "$dest" | cut -d' ' -f1)
[ "$got" = "$md5" ] || { echo "get_data: $dest has md5 $got, expected $md5" >&2; exit 1; }
echo "get_data: $dest ready ($(wc -c < "$dest") bytes)"
