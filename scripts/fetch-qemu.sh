#!/usr/bin/env bash
# Fetches Debian 12's QEMU 7.2 source package with apt, checks the upstream tarball's sha256,
# unpacks it with Debian's own patch series (dpkg-source -x), then applies qemu-patches/series.
# Re-running is cheap: the tree is unpacked again only when qemu-patches/ changed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_deb_src() {
  # apt-get source needs a deb-src entry for bookworm; reuse the mirror the machine already uses.
  if apt-get indextargets --format '$(CREATED_BY)' 2>/dev/null | grep -q '^Sources$'; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "no deb-src entry for bookworm and not root; run as root once"
  local src=/etc/apt/sources.list.d/debian.sources uris signed
  if [ -f "$src" ]; then
    uris=$(sed -n 's/^URIs:[[:space:]]*//p' "$src" | grep -v security | head -n1)
    signed=$(sed -n 's/^Signed-By:[[:space:]]*//p' "$src" | head -n1)
  else
    uris=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  [ -n "${uris:-}" ] || die "cannot find the Debian mirror in $src or /etc/apt/sources.list"
  say "adding a deb-src entry for bookworm ($uris)"
  {
    echo "Types: deb-src"
    echo "URIs: $uris"
    echo "Suites: bookworm bookworm-updates"
    echo "Components: main"
    [ -n "${signed:-}" ] && echo "Signed-By: $signed"
  } > /etc/apt/sources.list.d/qcow2b-deb-src.sources
  apt-get update -qq
}

download() {
  mkdir -p "$QEMU_PKG_DIR"
  if ls "$QEMU_PKG_DIR"/qemu_*.dsc >/dev/null 2>&1; then
    return
  fi
  ensure_deb_src
  say "apt-get source --download-only qemu"
  (cd "$QEMU_PKG_DIR" && apt-get source --download-only -qq qemu) \
    || die "apt-get source qemu failed"
}

verify() {
  local orig
  orig=$(ls "$QEMU_PKG_DIR"/qemu_7.2*.orig.tar.* 2>/dev/null | head -n1)
  [ -n "$orig" ] || die "no qemu_7.2 upstream tarball in $QEMU_PKG_DIR (is the distribution's QEMU still 7.2?)"
  echo "$QEMU_ORIG_SHA256  $orig" | sha256sum -c --quiet - \
    || die "sha256 of $(basename "$orig") does not match $QEMU_ORIG_SHA256"
  say "upstream tarball $(basename "$orig"): sha256 ok"
}

series_stamp() {
  (cd "$QCOW2B_ROOT/qemu-patches" && cat series $(grep -v '^#' series)) | sha256sum | cut -d' ' -f1
}

unpack_and_patch() {
  local stamp want
  want=$(series_stamp)
  stamp=$QEMU_SRC/.qcow2b-patched
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "QEMU tree up to date with qemu-patches/"
    return
  fi
  # Unpack into a fresh folder, patch it there, then copy over only the files whose contents
  # differ, so that an unchanged file keeps its timestamp and ninja rebuilds only what changed.
  local fresh=$BUILD_ROOT/qemu-src.new
  rm -rf "$fresh"
  say "dpkg-source -x (Debian's patch series)"
  dpkg-source --no-check -x "$(ls "$QEMU_PKG_DIR"/qemu_*.dsc | head -n1)" "$fresh" >/dev/null \
    || die "dpkg-source -x failed"
  rm -f "$BUILD_ROOT"/qemu_*.orig.tar.*    # dpkg-source leaves a copy beside its output
  local p
  while read -r p; do
    case "$p" in ''|'#'*) continue ;; esac
    [ -f "$QCOW2B_ROOT/qemu-patches/$p" ] || die "qemu-patches/series names $p, which does not exist"
    if ! patch -d "$fresh" -p1 --batch --forward --quiet < "$QCOW2B_ROOT/qemu-patches/$p"; then
      die "qemu-patches/$p does not apply to $(basename "$(ls "$QEMU_PKG_DIR"/qemu_*.dsc)")"
    fi
    say "applied qemu-patches/$p"
  done < "$QCOW2B_ROOT/qemu-patches/series"
  mkdir -p "$QEMU_SRC"
  rsync -r -l --checksum --delete --exclude=/qcow2b --exclude=/.qcow2b-patched "$fresh/" "$QEMU_SRC/"
  rm -rf "$fresh"
  # The meson fragment stays in this repository; QEMU's tree reaches it through a link, so a
  # change to the Rust sources is picked up by the ordinary ninja step.
  ln -sfn "$QCOW2B_ROOT/meson" "$QEMU_SRC/qcow2b"
  echo "$want" > "$stamp"
}

# tests/qemu-iotests/ of this repository mirrors QEMU's tests/qemu-iotests/: the project's own
# iotests (tests/qcow2b-*), the reference outputs of QEMU's tests where qcow2b differs by
# design (NNN.out.qcow2b) and qcow2b-not-run. QEMU's tree reaches each file through a link at
# the same place, so the repository stays the source and an edit needs no reinstall.
install_iotests() {
  local src=$QCOW2B_ROOT/tests/qemu-iotests dst=$QEMU_SRC/tests/qemu-iotests rel
  # Links to files since renamed or removed here.
  find "$dst" -xtype l -lname "$src/*" -delete
  while read -r rel; do
    [ ! -e "$dst/$rel" ] || [ -L "$dst/$rel" ] || die "QEMU's tree has its own tests/qemu-iotests/$rel"
    ln -sfn "$src/$rel" "$dst/$rel"
  done < <(cd "$src" && find . -type f ! -name '*~' | sed 's|^\./||' | sort)
  say "linked $(cd "$src" && find . -type f | wc -l) files of tests/qemu-iotests/ into QEMU's tree"
}

download
verify
unpack_and_patch
install_iotests
