#!/bin/busybox sh
# /init of the paper benchmark's guest (bench/guest/build-guest.sh puts it in the initramfs).
# Makes ext4 on /dev/vda, mounts it, and runs the tests, each between two markers on the
# serial console that the host (run-guest.py) timestamps to split its fdatasync counts:
#   BENCH-BEGIN name / BENCH-END name, with the test's own output in between.
# guest.shell=1 on the kernel command line gives a shell on the console instead.
# Parameters on the kernel command line: bench.fresh=N (fio random 4 KiB writes on the bare
# fresh disk, O_DIRECT, one fsync at the end), bench.dd=N (dd count), bench.seq=N (fio sequential
# 64 KiB writes, fdatasync after each), bench.rand=N (fio random 4 KiB writes, fsync after
# each), bench.sqlite=N (SQLite autocommit inserts, once with journal_mode=DELETE and once
# with WAL, synchronous=FULL: each insert a transaction, each commit an fsync); 0 skips a test.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

param() { # name default
  v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^bench\.$1=//p")
  echo "${v:-$2}"
}

for m in $(cat /lib/modules/load-order); do
  insmod /lib/modules/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
# The crash workloads of tests/crash/vm.py instead of the benchmark.
if grep -q 'crash.run=1' /proc/cmdline; then
  while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  exec /bin/busybox sh /crash
fi

# A shell on the serial console instead of the benchmark, for tests that drive the guest
# step by step (tests/integration/libvirt-dropin.py): it prints SHELL-READY, then runs what
# the host types.
if grep -q 'guest.shell=1' /proc/cmdline; then
  echo SHELL-READY
  exec /bin/busybox sh
fi

marker() { sleep 1; echo "BENCH-$1 $2"; }

echo "BENCH-KERNEL $(uname -r)"
# Random 4 KiB writes on the fresh thin disk itself, before any file system: every write
# lands in a cluster nothing was written to yet (the most common qcow2 benchmark). O_DIRECT,
# no fsync, then one at the end.
n=$(param fresh 2000)
if [ "$n" -gt 0 ]; then
  marker BEGIN "fio-fresh $n"
  /usr/bin/fio --name=fresh --filename=/dev/vda --rw=randwrite --bs=4k --number_ios="$n" \
    --ioengine=sync --direct=1 --end_fsync=1 --randrepeat=1 --norandommap 2>&1 \
    | grep -E 'write: IOPS|^ +lat' | head -n 2
  marker END "fio-fresh $n"
fi

marker BEGIN mkfs
/sbin/mke2fs -q -F -t ext4 /dev/vda
mount -t ext4 /dev/vda /mnt
marker END mkfs

n=$(param dd 200)
if [ "$n" -gt 0 ]; then
  marker BEGIN "dd $n"
  /usr/bin/dd if=/dev/zero of=/mnt/dd bs=64k count="$n" oflag=dsync 2>&1 | tail -n1
  marker END "dd $n"
fi

n=$(param seq 128)
if [ "$n" -gt 0 ]; then
  marker BEGIN "fio-seq $n"
  /usr/bin/fio --name=seq --filename=/mnt/fio-seq --rw=write --bs=64k --size=$((n * 64))k \
    --ioengine=sync --fdatasync=1 --fallocate=none 2>&1 | grep -E 'write: IOPS|sync.*lat.*avg|^ +lat' | head -n 3
  marker END "fio-seq $n"
fi

n=$(param rand 256)
if [ "$n" -gt 0 ]; then
  marker BEGIN "fio-rand $n"
  /usr/bin/fio --name=rand --filename=/mnt/fio-rand --rw=randwrite --bs=4k --size=$((n * 4))k \
    --ioengine=sync --fsync=1 --randrepeat=1 --norandommap 2>&1 | grep -E 'write: IOPS|sync.*lat.*avg|^ +lat' | head -n 3
  marker END "fio-rand $n"
fi

n=$(param sqlite 200)
if [ "$n" -gt 0 ]; then
  for mode in delete wal; do
    {
      echo "PRAGMA journal_mode=$mode;"
      echo "PRAGMA synchronous=FULL;"
      echo "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);"
      i=0
      while [ $i -lt "$n" ]; do
        echo "INSERT INTO t(v) VALUES('row $i of the benchmark, autocommit');"
        i=$((i + 1))
      done
    } > /tmp/inserts.sql
    marker BEGIN "sqlite-$mode $n"
    /usr/bin/sqlite3 /mnt/sqlite-$mode.db < /tmp/inserts.sql 2>&1 | grep -v '^\(delete\|wal\)$'
    echo "sqlite rows: $(/usr/bin/sqlite3 /mnt/sqlite-$mode.db 'SELECT count(*) FROM t;')"
    marker END "sqlite-$mode $n"
  done
fi

umount /mnt
echo BENCH-DONE
poweroff -f
