#!/bin/busybox sh
# The real guest's crash workloads (tests/crash/vm.py): bench/guest/init.sh runs this file
# instead of the benchmark when the kernel command line has crash.run=1. Everything happens
# on ext4 on /dev/vda; every acknowledgement an application received is written, the moment
# it returns, to the acknowledgement disk /dev/vdb as one 512-byte O_DIRECT write
# "ACK <item>". The host records that disk behind its own qcow2b-recorder, whose sequence
# numbers are shared with the recorders of the disk under test: an acknowledgement's issue
# number says which crash points come after the application was told "done".
#
# Items, in the order they are acknowledged (the checker's prefix order):
#   mkfs              mke2fs finished (it syncs the device before it exits)
#   log:K             record K of /mnt/log appended and fsync'd (crash.log=N records)
#   ar:K              /mnt/ar/f(K mod 4) replaced by version K: written to a temporary file,
#                     fsync'd, renamed over the old one, the directory fsync'd (crash.ar=N)
#   sqlite-MODE:0     the table created; sqlite-MODE:K the K-th autocommit insert returned
#                     (crash.sqlite=N per journal mode: DELETE with synchronous=EXTRA, then
#                     WAL with synchronous=FULL; see below)
#   burst             crash.burst=N small files written without fsync, then sync(1)
# Every record and file carries the MD5 of its own text, so the checker tells whole from
# torn. Content generators must match vm.py's (record_text, ar_text, burst_text, row_text).

param() { # name default
  v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^crash\.$1=//p")
  echo "${v:-$2}"
}

# ack ITEM: the application's acknowledgement, on the acknowledgement disk (sector = count).
cat > /bin/ack <<'EOF'
#!/bin/busybox sh
n=$(cat /tmp/ack-count 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > /tmp/ack-count
printf 'ACK %s\n' "$1" | /usr/bin/dd of=/dev/vdb bs=512 seek=$n conv=sync,notrunc \
  oflag=direct status=none || echo "CRASH-ERROR ack $1 failed"
EOF
chmod +x /bin/ack

# with_sum TEXT: TEXT, a space and the MD5 of TEXT, then a newline.
with_sum() { printf '%s %s\n' "$1" "$(printf '%s' "$1" | md5sum | cut -c1-32)"; }
pad() { # N: N characters of filler
  printf "%${1}s" "" | tr ' ' 'x'
}

echo "CRASH-BEGIN"
/sbin/mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard /dev/vda \
  || echo "CRASH-ERROR mke2fs"
ack mkfs
# noinit_itable: no background zeroing of inode tables, so that the run is the workload's.
mount -t ext4 -o noinit_itable /dev/vda /mnt || echo "CRASH-ERROR mount"

n=$(param log 16)
filler=$(pad 64)
k=1
while [ $k -le "$n" ]; do
  with_sum "record $(printf %06d $k) $filler" \
    | /usr/bin/dd of=/mnt/log oflag=append conv=notrunc,fsync status=none
  ack log:$k
  k=$((k + 1))
done

n=$(param ar 12)
mkdir -p /mnt/ar
/usr/bin/sync /mnt
filler=$(pad 3000)
k=1
while [ $k -le "$n" ]; do
  f=/mnt/ar/f$((k % 4))
  with_sum "file $((k % 4)) version $(printf %06d $k) $filler" \
    | /usr/bin/dd of=$f.tmp conv=fsync status=none
  mv $f.tmp $f
  /usr/bin/sync /mnt/ar
  ack ar:$k
  k=$((k + 1))
done

n=$(param sqlite 12)
# synchronous=EXTRA in DELETE mode: with FULL, SQLite does not sync the directory after it
# deletes the journal (the commit), so a crash may bring the journal back and roll the last
# acknowledged transaction back (SQLite's documented behaviour; this harness saw it on QEMU's
# qcow2 too). In WAL mode FULL is durable.
for mode in delete wal; do
  sync=FULL
  [ $mode = delete ] && sync=EXTRA
  {
    echo "PRAGMA journal_mode=$mode;"
    echo "PRAGMA synchronous=$sync;"
    echo "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);"
    echo ".shell ack sqlite-$mode:0"
    k=1
    while [ $k -le "$n" ]; do
      echo "INSERT INTO t VALUES($k, 'row $k of the crash workload, autocommit');"
      echo ".shell ack sqlite-$mode:$k"
      k=$((k + 1))
    done
  } > /tmp/crash.sql
  /usr/bin/sqlite3 /mnt/sqlite-$mode.db < /tmp/crash.sql > /tmp/sqlite.out 2>&1 \
    || { echo "CRASH-ERROR sqlite-$mode"; cat /tmp/sqlite.out; }
done

n=$(param burst 24)
mkdir -p /mnt/burst
filler=$(pad 2000)
k=1
while [ $k -le "$n" ]; do
  with_sum "burst file $(printf %06d $k) $filler" > /mnt/burst/b$k
  k=$((k + 1))
done
/usr/bin/sync
ack burst

umount /mnt || echo "CRASH-ERROR umount"
echo "CRASH-DONE $(cat /tmp/ack-count)"
poweroff -f
